"""Benchmarks: `python -m bench [--quick]`, each figure beside a baseline measured with it.

How a module is written (idle_checks, jobs, output_capture, git_calls, footprint):

- ``measure(root, ..., rounds) -> list[report.Row]``: set up once under ``root``
  (repositories, a worker on the shared Redis), then measure in rounds with
  ``harness.in_rounds(rounds, ours, baseline, ...)``. Each step is a function that
  measures one side once and returns its figures by name (``{"p50": 31.2}``);
  the steps take turns going first, so postdeploy and its baseline see the same
  machine. ``in_rounds`` returns each figure's values, one per round.
- A ``report.Row`` takes postdeploy's values and the baseline's (same rounds), a
  unit, the baseline's name, a target and a check of it on the medians
  (``lambda r: r.ratio <= 1.5``). The table shows medians with min–max.
- ``__main__.MEASURES`` names the module's entry (for ``--only``) and passes it
  its sizes, smaller with ``--quick``.
"""
