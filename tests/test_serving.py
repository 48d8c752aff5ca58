"""Streaming inference equals whole-window inference, and evaluation scores what it should."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import scripted_actions, write_episode_file

from vla_pipeline.data.frames import model_frame
from vla_pipeline.evaluation.evaluate import evaluate, predict_frames
from vla_pipeline.data.ingest import ingest_episodes
from vla_pipeline.policy.model import build_policy
from vla_pipeline.policy.policy_config import PolicyConfig
from vla_pipeline.data.schema import ACTION_SCALE, INSTRUCTION_TEMPLATE
from vla_pipeline.policy.serving import StreamingPolicy
from vla_pipeline.data.schema import mirror_instruction

LEFT = INSTRUCTION_TEMPLATE.format(side="left", target="cup")


def set_constant_output(policy, x: float, y: float) -> None:
    """Make the head output the normalised action (tanh(x), tanh(y)) at every chunk step."""
    last = policy.head.mlp[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(torch.tensor([x, y] * policy.config.chunk))


@pytest.fixture(scope="module")
def policy(tiny_backbone_path):
    return build_policy(PolicyConfig.tiny(backbone=str(tiny_backbone_path), window=3, chunk=2)).eval()


@pytest.fixture(scope="module")
def raw_frames():
    """An episode's camera frames as the robot delivers them: BGR, not 224×224."""
    return np.random.default_rng(0).integers(0, 256, (7, 90, 160, 3), dtype=np.uint8)


def test_streaming_equals_whole_window_recompute(policy, raw_frames):
    stream = StreamingPolicy(policy, colour_order="BGR")
    rgb = torch.from_numpy(np.stack([model_frame(f, "BGR") for f in raw_frames]))
    W = policy.config.window
    for t, frame in enumerate(raw_frames):
        streamed = stream.step(frame, LEFT)
        window = rgb[max(0, t - W + 1) : t + 1][None]
        recomputed = policy.predict(window, [LEFT])[0].numpy()
        assert streamed.shape == (policy.config.chunk, 2)
        np.testing.assert_allclose(streamed, recomputed, atol=1e-5, err_msg=f"frame {t}")
        assert stream.frames_in_window == min(t + 1, W)
    # the episode-level path used by evaluation gives the same numbers
    np.testing.assert_allclose(predict_frames(policy, rgb.numpy(), LEFT)[-1], streamed, atol=1e-5)


def test_rgb_input_and_reset(policy, raw_frames):
    bgr = StreamingPolicy(policy, colour_order="BGR")
    rgb = StreamingPolicy(policy, colour_order="RGB")
    first = [bgr.step(f, LEFT) for f in raw_frames[:4]]
    second = [rgb.step(np.ascontiguousarray(f[..., ::-1]), LEFT) for f in raw_frames[:4]]
    np.testing.assert_allclose(first, second, atol=1e-6)
    bgr.reset()
    np.testing.assert_allclose(bgr.step(raw_frames[0], LEFT), first[0], atol=1e-6)


def test_a_new_instruction_re_encodes_the_cached_frames(policy, raw_frames):
    right = mirror_instruction(LEFT)
    switched = StreamingPolicy(policy)
    for frame in raw_frames[:3]:
        switched.step(frame, LEFT)
    fresh = StreamingPolicy(policy)
    for frame in raw_frames[1:3]:
        fresh.step(frame, right)
    np.testing.assert_allclose(switched.step(raw_frames[3], right), fresh.step(raw_frames[3], right), atol=1e-5)


def test_step_rejects_what_is_not_a_camera_frame(policy):
    stream = StreamingPolicy(policy)
    with pytest.raises(ValueError, match="uint8"):
        stream.step(np.zeros((90, 160, 3), np.float32), LEFT)
    with pytest.raises(ValueError, match="colour_order"):
        StreamingPolicy(policy, colour_order="YUV")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    folder = tmp_path_factory.mktemp("episodes")
    paths = [
        write_episode_file(folder / f"episode_20250614_10150{i}_1box_hori_{side}_core_medium.h5",
                           actions=scripted_actions(side), seed=i)
        for i, side in enumerate(["left", "right", "left"])
    ]
    store_path = folder.parent / "store.zarr"
    ingest_episodes(paths, store_path)
    return store_path


def _episode_ids(store_path):
    from vla_pipeline.data.store import WindowStore

    return WindowStore(store_path).episode_ids()


@pytest.mark.parametrize("constant, baseline", [((20.0, 0.0), "always_forward"), ((0.0, 0.0), "zero")])
def test_a_constant_policy_scores_exactly_its_baseline(tiny_backbone_path, store, constant, baseline):
    policy = build_policy(PolicyConfig.tiny(backbone=str(tiny_backbone_path)))
    set_constant_output(policy, *constant)  # tanh(20) is exactly 1.0 in float32
    result = evaluate(policy, store, _episode_ids(store), train_mean=(0.5, 0.0)).metrics
    assert result["model"] == result["baselines"][baseline]
    assert result["margin"]["first"]["direction_accuracy_margin"] <= 0
    # 3 episodes × every frame of 18 (the last, whose chunk runs past the end, included), the
    # episode_start frame left out; all steps: the last frame's second step has no target
    assert result["episodes"] == 3 and result["predictions"] == 3 * 17
    assert sum(result["model"]["first"]["support"].values()) == 3 * 17
    assert sum(result["model"]["all"]["support"].values()) == 3 * (17 * 2 - 1)
    assert result["instruction_sensitivity"]["flip_fraction_first"] == 0.0  # a constant ignores the text
    assert set(result["by_side"]) == {"left", "right"}
    assert result["by_scenario"]["1box_hori_left"]["predictions"] == 34


def test_evaluation_targets_are_the_recorded_chunks(tiny_backbone_path, store):
    policy = build_policy(PolicyConfig.tiny(backbone=str(tiny_backbone_path)))
    evaluation = evaluate(policy, store, _episode_ids(store)[:1], train_mean=(0.5, 0.0))
    episode = evaluation.episodes[0]
    recorded = scripted_actions(episode.side)[:, :2]
    assert episode.frames.tolist() == list(range(1, 18))  # frame 0, episode_start, is not scored
    np.testing.assert_array_equal(episode.true[:, 0], recorded[1:18])
    np.testing.assert_array_equal(episode.true[:-1, 1], recorded[2:18])
    assert np.isnan(episode.true[-1, 1]).all()  # past the last recorded action: no target
    assert np.abs(episode.pred).max() <= ACTION_SCALE + 1e-6
    assert episode.pred_swapped is not None  # left/right episodes are also run with the sides swapped


def test_prompts_are_tokenised_once_per_instruction(policy, raw_frames, monkeypatch):
    import vla_pipeline.policy.model as model_module

    calls = []
    original = model_module.encode_prompts
    monkeypatch.setattr(model_module, "encode_prompts", lambda *a, **k: calls.append(1) or original(*a, **k))
    policy._prompts.clear()
    stream = StreamingPolicy(policy, compiled=False)
    for frame in raw_frames:
        stream.step(frame, LEFT)
    assert len(calls) == 1


def test_a_compiled_backbone_that_fails_falls_back_to_eager(policy, raw_frames, monkeypatch):
    reference = StreamingPolicy(policy, compiled=False)
    expected = [reference.step(frame, LEFT) for frame in raw_frames[:3]]

    def broken_compile(module, **options):
        def run(*args, **kwargs):
            raise RuntimeError("no CUDA graphs here")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    stream = StreamingPolicy(policy, compiled=True)
    assert stream.metadata["compiled"] is True
    got = [stream.step(frame, LEFT) for frame in raw_frames[:3]]
    assert stream.metadata["compiled"] is False and "no CUDA graphs here" in stream.metadata["compile_error"]
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert policy.backbone_call is None


def test_a_compiled_backbone_gives_the_same_actions(policy, raw_frames, monkeypatch):
    reference = StreamingPolicy(policy, compiled=False)
    expected = [reference.step(frame, LEFT) for frame in raw_frames[:3]]
    compiled_calls = []

    def tracing_compile(module, **options):
        assert options == {"dynamic": False}
        return lambda *a, **k: compiled_calls.append(1) or module(*a, **k)

    monkeypatch.setattr(torch, "compile", tracing_compile)
    stream = StreamingPolicy(policy, compiled=True)
    try:
        got = [stream.step(frame, LEFT) for frame in raw_frames[:3]]
    finally:
        policy.backbone_call = None
    assert len(compiled_calls) == 3 and stream.metadata["compiled"] is True
    np.testing.assert_allclose(got, expected, atol=1e-6)


def reusing_backbone_call(policy):
    """A backbone call that, like a CUDA graph or torch.compile's reduce-overhead mode, returns one
    output buffer that every call overwrites."""
    buffers: dict[tuple, torch.Tensor] = {}

    def call(*tensors):
        features = policy.frame_features(*tensors)
        buffer = buffers.setdefault(tuple(features.shape), torch.empty_like(features))
        return buffer.copy_(features)

    return call


def test_a_backbone_call_that_reuses_its_output_buffer_streams_the_same_actions(policy, raw_frames):
    regression = build_policy(PolicyConfig.tiny(backbone=policy.config.backbone, window=4, chunk=2,
                                                seed=3)).eval()
    frames = np.concatenate([raw_frames, raw_frames[:, ::-1]])  # 14 distinct frames, past the window
    right = mirror_instruction(LEFT)
    instructions = [LEFT] * 8 + [right] * 6  # a new instruction re-encodes the window too
    eager = StreamingPolicy(regression, compiled=False)
    expected = [eager.step(frame, text) for frame, text in zip(frames, instructions)]
    regression.backbone_call = reusing_backbone_call(regression)
    try:
        stream = StreamingPolicy(regression, compiled=False)
        stream.metadata["compiled"] = True  # as a stream over a captured backbone runs
        got = []
        for frame, text in zip(frames, instructions):
            got.append(stream.step(frame, text))
            window = list(stream._features)
            assert len({feature.data_ptr() for feature in window}) == len(window)
            assert not any(torch.equal(window[i], window[j]) for i in range(len(window))
                           for j in range(i + 1, len(window)))
    finally:
        regression.backbone_call = None
    assert len(got) >= 10
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_streams_over_one_policy_compile_it_once(policy, raw_frames, monkeypatch):
    compiles = []
    monkeypatch.setattr(torch, "compile", lambda module, **options: compiles.append(1) or module)
    try:
        first = StreamingPolicy(policy, compiled=True)
        second = StreamingPolicy(policy, compiled=True)
        for stream in (first, second):
            stream.step(raw_frames[0], LEFT)
    finally:
        policy.backbone_call = None
    assert len(compiles) == 1 and second.metadata["compiled"] is True


def test_compiled_vs_eager_catches_a_window_that_aliases_the_backbone_buffer(policy, monkeypatch):
    """The GPU check (`compiled_vs_eager`, run by test_gpu_streaming.py and benchmarks/gpu.py) on the
    CPU, with a buffer-reusing backbone call standing in for the CUDA graph."""
    from vla_pipeline.policy.model import MobileVLAPolicy
    from vla_pipeline.policy.serving import compiled_vs_eager
    from vla_pipeline.sim.rollout import guide_camera_frames

    monkeypatch.setattr(MobileVLAPolicy, "compile_backbone",
                        lambda self: setattr(self, "backbone_call", reusing_backbone_call(self)))
    episodes = guide_camera_frames(20, seed=3, env_kwargs={"height": 90, "width": 160})
    assert sum(len(frames) for frames, _ in episodes) >= 20
    try:
        assert compiled_vs_eager(policy, episodes) <= 1e-6
        monkeypatch.setattr(StreamingPolicy, "_encode", lambda self, pixels, texts: self.policy.encode_images(
            pixels, texts, self.metadata["compiled"]))  # the window keeps the buffer itself
        with pytest.raises(AssertionError, match="shares memory"):
            compiled_vs_eager(policy, episodes)
    finally:
        policy.backbone_call = None
