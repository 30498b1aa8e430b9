"""Prefect flows over the plain functions of `tasks/`, and the `fss` CLI (`flows/cli/`)."""

import logging

# The library logs through logging.getLogger(__name__) under `tasks`; its INFO lines (resumed
# checkpoints, labels a point uses, the pseudo phase it reuses) are run logs: the CLI sends the
# `tasks` logger to Prefect's API (PREFECT_LOGGING_EXTRA_LOGGERS) and keeps warnings on the
# terminal. Set here so Dask workers, which import flows to run our Prefect tasks, log alike.
logging.getLogger("tasks").setLevel(logging.INFO)
