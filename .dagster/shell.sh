# Sourced by .venv/bin/activate (`make install` adds the line): Dagster commands typed from the
# repository root use this instance and find the code location, with short log lines.
export DAGSTER_HOME="${DAGSTER_HOME:-$(cd "$VIRTUAL_ENV/.." && pwd)/.dagster}"

dagster() {
    # `dagster dev` reads workspace.yaml; DAGSTER_MODULE_NAME would give its webserver a second
    # code location and stop it, so it is never exported and never reaches `dev`.
    if [ "${1-}" = dev ]; then
        command env -u DAGSTER_MODULE_NAME dagster "$@"
        return
    fi
    # `dagster asset materialize` without a run config of its own gets the pipeline's console
    # logger (assets/console.py): progress lines, and a failure's reason printed once.
    if [ "${1-} ${2-}" = "asset materialize" ] && ! printf '%s\n' "$@" | grep -qE '^(-c|--config|--config-json)(=.*)?$'; then
        set -- "$@" -c "$(cd "$VIRTUAL_ENV/.." && pwd)/.dagster/console.yaml"
    fi
    DAGSTER_MODULE_NAME="${DAGSTER_MODULE_NAME:-vla_pipeline.definitions}" \
        PYTHONWARNINGS="${PYTHONWARNINGS:-ignore::FutureWarning:click.core}" command dagster "$@"
}
