"""Training assets: the train/val split of the stored episodes (the LoRA adapter follows)."""

import dagster as dg

from assets.episodes import episode_windows
from resources import WindowStoreResource
from vla_pipeline.split import load_split, save_split, split_from_store, train_action_stats
from vla_pipeline.schema import ACTION_DIMS


class SplitConfig(dg.Config):
    val_fraction: float = 0.2


def _markdown_counts(summary: dict, key: str) -> str:
    names = sorted(set(summary["train"][key]) | set(summary["val"][key]))
    rows = [f"| {name} | {summary['train'][key].get(name, 0)} | {summary['val'][key].get(name, 0)} |" for name in names]
    return "\n".join([f"| {key[:-1]} | train | val |", "| --- | ---: | ---: |", *rows])


@dg.asset(group_name="training", deps=[episode_windows], kinds={"json"})
def train_val_split(context: dg.AssetExecutionContext, config: SplitConfig, window_store: WindowStoreResource):
    """Train/val split by episode: stratified by side and scenario, and stable — an episode
    never changes sides as episodes are added. Rejected episodes are excluded and listed.
    Saved as `split.json` in the store; the value is the split itself."""
    store = window_store.open()
    previous = load_split(store)
    split = split_from_store(store, previous, config.val_fraction)
    if not split.train:
        raise dg.Failure(f"no stored episodes in {store.path}: ingest episodes before splitting")
    save_split(store, split)
    attrs = {episode_id: store.episode_attrs(episode_id) for episode_id in split.train + split.val}
    summary = split.summary(attrs)
    stats = train_action_stats(store, split)
    kept = len(set(previous.train + previous.val) & set(attrs)) if previous else 0
    context.log.info(
        f"{len(split.train)} train / {len(split.val)} val episodes "
        f"({kept} kept from the previous split, {len(split.excluded)} rejected excluded)"
    )
    return dg.Output(
        split.to_dict(),
        metadata={
            "train_episodes": len(split.train),
            "val_episodes": len(split.val),
            "train_windows": summary["train"]["windows"],
            "val_windows": summary["val"]["windows"],
            "by_side": dg.MetadataValue.md(_markdown_counts(summary, "sides")),
            "by_scenario": dg.MetadataValue.md(_markdown_counts(summary, "scenarios")),
            "train_action_mean": dict(zip(ACTION_DIMS, stats.mean.round(4).tolist())),
            "train_action_std": dict(zip(ACTION_DIMS, (stats.var**0.5).round(4).tolist())),
            "excluded": dg.MetadataValue.json(split.excluded),
            "split_file": dg.MetadataValue.path(str(store.path / "split.json")),
        },
    )
