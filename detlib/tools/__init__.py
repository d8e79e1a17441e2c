"""The command-line tools, the top layer; ``tools/*.py`` and the ``detlib-*`` console scripts only call ``main``.

Entry points: ``evaluate`` (COCO AP of a run's checkpoint or of a results file), ``compare_runs``
(mean ± std over seeds, paired t-test, figures; also called by the sweep callbacks, ``sweep_callbacks``),
``visualize``, ``predict``, ``export``, ``plot_losses``, ``plot_logs``, ``browse_dataset``, ``benchmark``.
Their own parts: ``cli`` (errors as one line), ``results`` (COCO-results files), ``compare_plots`` /
``compare_errors`` (the comparison's figures and tables), ``bench_models`` / ``bench_timing`` /
``bench_eval`` (the benchmark's). What they share with the library lives below them: ``detlib.runs``
(run folders, their runs and groups), ``detlib.engine.restore`` (a run's model rebuilt),
``detlib.compose`` (the packaged configs), ``detlib.evaluation.stats`` / ``val_sampling`` (the statistics).
"""
