from gradleak.cli import main

main()
