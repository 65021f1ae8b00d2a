"""The Ray edge: the only package in raydd that imports ray (besides the sweep/bench CLIs).

  cluster.py  start or join Ray (dashboard on 127.0.0.1, token auth untouched)
  data.py     Ray Data: rows (class, slot, seed) -> actor pool holding the frozen backbone
  train.py    Ray Train: run any plain training loop (raydd.train_hooks) as a TorchTrainer
  runner.py   RayRunner: what a method's Context uses to generate and train on the cluster
"""
