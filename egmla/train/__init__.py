"""Training: config, optimizer and schedule, checkpoints, distributed wrappers, metrics, the trainer
loop (`egmla.train.trainer.train`) and the `egmla train` / `egmla compare` commands. The model code
never imports from here."""
