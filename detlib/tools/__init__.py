"""The logic of the command-line tools; ``tools/*.py`` and the ``detlib-*`` console scripts only call ``main``.

Entry points: ``evaluate`` (COCO AP of a run's checkpoint or of a results file), ``compare_runs``
(mean ± std over seeds, paired t-test, figures; also called by the sweep callback), ``visualize``,
``plot_losses``, ``benchmark``. Shared parts: ``cli`` (errors as one line), ``configs`` (composing
``configs/``), ``rundir`` (reading a run folder, rebuilding its model), ``results`` (COCO-results files),
``runs`` / ``groups`` (finding and grouping runs), ``stats`` (the t-test), ``compare_plots``, and
``bench_models`` / ``bench_timing`` / ``bench_eval`` (the benchmark's parts).
"""
