from gradleak.entry import main

main()
