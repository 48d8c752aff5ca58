"""The terminal's view of a run: one short line per log message, and a failure's reason once.

Dagster's own console logger prints every framework event at DEBUG with a long prefix, and
repeats a failed step's error, stack trace included, in the run's failure event. This logger
replaces it (as "console", so run configs that set `loggers.console.config.log_level` still
work) for `dagster asset materialize`, `vla-pipeline ingest` and runs under `dagster dev`:

    14:02:11 lora_adapter  epoch 3/10: train loss 0.21, val loss 0.25
    14:02:40 run 5f0b0c06 failed (steps: lora_adapter)

The run's event log in the UI is untouched: this only decides what the terminal shows.
"""

import logging
import sys
import time

import dagster as dg
from dagster._core.log_manager import get_log_record_metadata, has_log_record_metadata  # not exported in 1.13

RUN_ENDS = {
    dg.DagsterEventType.RUN_SUCCESS: "succeeded",
    dg.DagsterEventType.RUN_FAILURE: "failed",
    dg.DagsterEventType.RUN_CANCELED: "was canceled",
}
# Selects this logger for a run (Dagster instantiates a job's loggers only when the run config names them).
RUN_CONFIG = {"loggers": {"console": {"config": {"log_level": "INFO"}}}}


class ConsoleFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        clock = time.strftime("%H:%M:%S", time.localtime(record.created))
        if not has_log_record_metadata(record):
            return f"{clock} {record.getMessage()}"
        meta = get_log_record_metadata(record)
        event = meta["dagster_event"]
        where = meta["step_key"] or meta["job_name"] or "dagster"
        message = meta["orig_message"]
        kind = event.event_type if event is not None else None
        if kind in RUN_ENDS:
            line = f"{clock} run {(meta['run_id'] or '')[:8]} ({meta['job_name']}) {RUN_ENDS[kind]}"
            if kind == dg.DagsterEventType.RUN_SUCCESS:
                return line
            data = event.event_specific_data
            if getattr(data, "first_step_failure_event", None) is not None:
                # The failed step has already said why; the run's end only names it.
                return f"{line}: {message.split(' failed. ', 1)[-1]}"
            error = getattr(data, "error", None)  # the run itself failed: nothing has said why yet
            return f"{line}: {message}" + (f"\n\n{error.to_string()}" if error is not None else "")
        if kind == dg.DagsterEventType.STEP_FAILURE:
            data = event.step_failure_data
            if data.user_failure_data is not None:  # a dg.Failure: its description is the whole story
                return f"{clock} {where}  failed: {data.user_failure_data.description}"
            return f"{clock} {where}  failed:\n\n{data.error_display_string}"  # a bug: its traceback, once
        if kind is not None:
            message = f"{event.event_type_value}: {message}"
        return f"{clock} {where}  {message}"


@dg.logger(
    {
        "log_level": dg.Field(str, is_required=False, default_value="INFO",
                              description="INFO shows the pipeline's own lines; DEBUG adds every Dagster event."),
        "name": dg.Field(str, is_required=False, default_value="dagster"),
    },
    description="Short console lines: time, step, message; a failure's reason once.",
)
def console_logger(init_context: dg.InitLoggerContext) -> logging.Logger:
    threshold = logging.getLevelName(init_context.logger_config["log_level"].upper())
    if not isinstance(threshold, int):
        raise dg.Failure(f"console logger: unknown log_level {init_context.logger_config['log_level']!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(ConsoleFormatter())
    handler.addFilter(lambda record: record.levelno >= threshold or _ends_run(record))
    logger = logging.Logger(init_context.logger_config["name"], level=logging.DEBUG)
    logger.addHandler(handler)
    return logger


def _ends_run(record: logging.LogRecord) -> bool:
    """The run's end is always shown: it is the one line that says how the command went."""
    if not has_log_record_metadata(record):
        return False
    event = get_log_record_metadata(record)["dagster_event"]
    return event is not None and event.event_type in RUN_ENDS
