"""The experiments layer: the jobs behind the ``llama-fast`` command, on top of ``llama_fast.meta``.

``config`` (ExperimentConfig, config.toml), ``data`` (sinusoid and Omniglot task samplers,
Lake's one-shot runs), ``checkpoint``, ``metrics``, ``plots``; the experiment itself split by
job: ``learners`` (models, optimizers, samplers), ``training`` (Trainer and the loop),
``selection`` (damping and noise chosen on meta-validation tasks), ``columns`` and
``evaluation`` (held-out metrics), ``reports`` (metrics.json, table, plots), ``run`` (the
train and eval jobs); ``cli`` is the command. Imported on demand: ``import llama_fast`` does
not load it (matplotlib and the data readers stay out of library users' processes).
"""
