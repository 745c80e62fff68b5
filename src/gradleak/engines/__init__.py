"""Adapters that run gradleak's federation on existing engines instead of the in-process loop:
a pool of worker processes or Ray actors (``pool``), Flower on Ray (``flower``), NVIDIA FLARE's
simulator (``nvflare``). Each replaces only ``Simulator.run_clients`` (and, under secure
aggregation, ``Simulator.observe``); ``experiments.engines`` names them and checks their settings,
so the experiment imports none of them until a run uses one."""
