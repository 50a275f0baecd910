"""Running a sweep: planning and resume, where runs execute, and the results folder.

Public names (import them from their modules): ``plan.run_sweep``, ``plan.plan``,
``plan.SweepEvents``, ``plan.SweepReport``, ``plan.SerialExecutor``,
``local.ProcessExecutor``, ``local.default_workers``, ``ray.RayExecutor``, ``store.Store``,
``run.execute_run``.

Modules: ``plan`` (the grid minus finished runs, the driver loop, the serial executor),
``run`` (one run anywhere: train it, make its record), ``local`` (a process pool on this
machine), ``ray`` (each run a Ray task), ``store`` (the output folder, committed atomically),
``index`` (the tables' format and index.log, what they hold).

To add an executor: one file here with a class whose ``map(tasks, store, events)`` yields
``(cfg, record)`` as runs finish, calling ``run.execute_run`` wherever the run happens, plus
its choice in ``bknbench.commands.make_executor``.
"""
