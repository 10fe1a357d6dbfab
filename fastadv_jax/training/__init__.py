"""The trainer: `train.train_and_evaluate(config, workdir)` and what it is made of.

train (the loop), run_plan (the config resolved once into its records and args, passed down),
run_results (results.json), train_metrics (metrics.jsonl's training rows, the
NaN stop), train_step (the jitted step: perturbation, loss with GradAlign, cross-device
update), train_state, engines (pmap or jit + shard_map), schedules, weight_averaging,
monitoring (diagnostics, early stopping, the overfitting flag), evaluation (the final and
periodic robust evaluation), checkpointing, workdir (config.json, results.json), saved_run (a
finished workdir read back), preemption (Ctrl-C / SIGTERM), metric_writers, timing,
config_validation, model_config (the config's model). Reads ml_collections configs; the library
below it takes plain arguments.
"""
