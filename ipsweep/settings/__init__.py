"""Settings: one module per task, each a class named by `_target_` in `conf/setting/<name>.yaml`."""
