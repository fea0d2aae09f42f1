"""Console-script entry points (setup.cfg `[options.entry_points]`) for mains that return a record.

The wrapper pip writes for a console script runs `sys.exit(main())`. `training.train.main` and the
eval mains return their result dict (tests and notebooks use it), and `sys.exit(a_dict)` prints the
dict to stderr and exits with status 1: a successful run would look failed to any shell or CI.
Each function here runs one such main and returns 0; errors still raise (status 1, traceback).
"""

from __future__ import annotations


def train() -> int:
    from dpsnr.training.train import main

    main()
    return 0


def eval_perplexity() -> int:
    from dpsnr.eval.common import setup_script_logging
    from dpsnr.eval.perplexity import main

    setup_script_logging()
    main()
    return 0


def eval_analytics() -> int:
    from dpsnr.eval.common import setup_script_logging
    from dpsnr.eval.reasoning_analytics import main

    setup_script_logging()
    main()
    return 0


def pool_health() -> int:
    from dpsnr.eval.common import setup_script_logging
    from dpsnr.eval.pool_health import main

    setup_script_logging()
    main()
    return 0
