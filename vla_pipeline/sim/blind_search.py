"""The best blind driver, found by search: the key sequence that reads the instruction's side and
nothing else, chosen as the best of whole families over a seeded plan.

Families (written for "left"; a right-side instruction plays them mirrored, LEFT_TO_RIGHT_KEYS):
- "strafe": out n × 'a', forward m × 'w', back k × 'd', then forward;
- "diagonal_out", "diagonal_back", "diagonal": the same with 'q' out and/or 'e' back;
- "strafe_out", "diagonal_strafe_out": out n, then forward (k = 0).
Ranges: n 0..6 (6 strafes, 2.76 m, already leave the arena), m 0..14 (14 presses, 6.4 m, run past
every target), k 0..n+2 (two presses past the start line); in v1, where only a stop press ends an
episode well, every sequence then goes forward f × 'w' (f 0..20) and stops (' '); in v0 the
forward tail is KeyScript's 'w' for good. At most the world's MAX_PRESSES presses (v1: the stop
included). A key string reached twice counts once, under the first family and parameters that
made it; in v0 a trailing 'w' is dropped (the tail holds 'w' anyway).

The evaluator replays the env exactly, in numpy over scenes × sequences: each scene as the env's
own reset makes it, each press the env's float32 command × PRESS_SECONDS, collisions sampled as
geometry.sweep samples them (only on presses that come near a box or the wall), the side of the
first position past the obstacle's far edge, then the env's judgements in the env's order; the
few stops or poses within 1e-9 of a threshold are judged again by the env's own functions.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from ..data.schema import ACTION_SCALE, DEAD_BAND, side_of_instruction
from . import varied
from .controllers import KeyScript, key_action
from .env import ARENA_BEHIND, ARENA_HALF_WIDTH, ENV_ID, OUTCOMES, SUCCESS_RADIUS, BoxNavEnv
from .geometry import ROBOT_RADIUS, SWEEP_STEP
from .operator import LEFT_TO_RIGHT_KEYS
from .scene import PRESS_SECONDS, WALL_X

SEARCH_SEED = 2027  # not an evaluation seed (0, 11): the search must not see the plans it is judged on
SEARCH_EPISODES = 96  # 8 runs of the plan's 12 cells
OUT_PRESSES = range(0, 7)
ALONGSIDE_PRESSES = range(0, 15)
BACK_BEYOND_OUT = 2  # k runs 0..n + this
FINAL_PRESSES = range(0, 21)  # v1 only: forward presses before the stop
FAMILIES = (("strafe", "a", "d"), ("diagonal_out", "q", "d"), ("diagonal_back", "a", "e"),
            ("diagonal", "q", "e"), ("strafe_out", "a", ""), ("diagonal_strafe_out", "q", ""))
STOP = " "
KEYS = "wsadqezc "  # key code = index here
NEAR = 1e-9  # a value this close to a threshold is judged again by the env's own function
_ENDED = {name: code for code, name in enumerate(OUTCOMES)}


@dataclass(frozen=True)
class Candidate:
    """One searched sequence: its keys (left-side form) and what made them."""

    keys: str
    family: str
    params: tuple[tuple[str, int], ...]  # (("n", 2), ("m", 7), ("k", 2)[, ("f", 5)])


@dataclass(frozen=True)
class BlindSearch:
    """The best sequence of the families on the search plan."""

    world: str
    keys: str  # left-side form; v1 ends in the stop ' ', v0 goes on with 'w'
    family: str
    params: tuple[tuple[str, int], ...]
    success: float  # on the search plan
    searched: int  # distinct sequences scored
    seed: int
    episodes: int


@dataclass(frozen=True)
class Scenes:
    """A plan's scenes, as the env's resets make them, in arrays (one row per scene)."""

    world: str
    boxes: np.ndarray  # (S, 2, 4) x0, x1, y0, y1; a 1-box scene repeats its box
    target: np.ndarray  # (S, 2)
    right: np.ndarray  # (S,) bool: the instruction names the right side
    far_x: np.ndarray  # (S,) the obstacle's far edge: passing it decides the side
    mid_y: np.ndarray  # (S,) the obstacle's centre line: left of it is "left"
    max_presses: int
    moves: np.ndarray  # (2, len(KEYS), 2) per side (left, right): each key's move in metres
    steps: np.ndarray  # (len(KEYS),) sweep samples per key's press

    def __len__(self) -> int:
        return len(self.target)


def left_to_side(keys: str, side: str) -> str:
    return keys if side == "left" else keys.translate(LEFT_TO_RIGHT_KEYS)


def families(world: str) -> list[Candidate]:
    """Every searched sequence of `world`, each key string once (see the module's docstring)."""
    v1, limit = world != ENV_ID, _max_presses(world)
    seen, found = set(), []
    for family, out, back in FAMILIES:
        for n in OUT_PRESSES:
            for m in ALONGSIDE_PRESSES:
                for k in range(1, n + BACK_BEYOND_OUT + 1) if back else (0,):  # k = 0: the out-only families
                    base = out * n + "w" * m + back * k
                    for f in FINAL_PRESSES if v1 else (None,):
                        keys = base + "w" * f + STOP if v1 else base.rstrip("w")
                        if len(keys) > limit or keys in seen:
                            continue
                        seen.add(keys)
                        params = (("n", n), ("m", m), ("k", k)) + ((("f", f),) if v1 else ())
                        found.append(Candidate(keys, family, params))
    return found


def _max_presses(world: str) -> int:
    return BoxNavEnv(world=world, camera=False, height=1, width=1).max_presses


def scenes_of(world: str, plan: list[tuple[int, str]]) -> Scenes:
    """Reset the env at every (seed, scenario) of `plan` and keep what a blind driver's fate depends on."""
    env = BoxNavEnv(world=world, camera=False, height=1, width=1)
    boxes, target, right = [], [], []
    for seed, token in plan:
        _, info = env.reset(seed=seed, options={"scenario": token})
        rects = [tuple(map(float, rect)) for rect in info["obstacles"]]
        boxes.append((rects + rects)[:2])
        target.append(info["target_xy"])
        right.append(info["side"] == "right")
    boxes = np.array(boxes, dtype=np.float64).reshape(len(plan), 2, 4)
    low_y, high_y = boxes[:, :, 2].min(1), boxes[:, :, 3].max(1)
    moves, steps = np.zeros((2, len(KEYS), 2)), np.zeros(len(KEYS), dtype=np.int64)
    for code, key in enumerate(KEYS):
        for side in (0, 1):
            # As the env turns a KeyScript's action into a move (BoxNavEnv.step)
            command = np.clip(key_action(left_to_side(key, ("left", "right")[side])),
                              env.action_space.low, env.action_space.high).astype(np.float64)
            moves[side, code] = (float(command[0] * PRESS_SECONDS), float(command[1] * PRESS_SECONDS))
        steps[code] = max(1, math.ceil(math.hypot(*moves[0, code]) / SWEEP_STEP))
    return Scenes(world, boxes, np.array(target, dtype=np.float64).reshape(-1, 2), np.array(right, bool),
                  boxes[:, :, 1].max(1), np.array([(a + b) / 2 for a, b in zip(low_y, high_y)]),
                  env.max_presses, moves, steps)


def _stop_keys() -> str:
    """The keys whose command falls within the dead band on both axes: v1's stop press."""
    return "".join(key for key in KEYS
                   if np.all(np.abs(key_action(key).astype(np.float64)) <= DEAD_BAND * ACTION_SCALE))


@dataclass
class _Drives:
    """Chains (keys, then 'w' for good) driven in every scene: how and when each ended, and
    whether a stop after P presses would have arrived (v1)."""

    end_step: np.ndarray  # (S, C): the press that ended it
    end_code: np.ndarray  # (S, C): index into OUTCOMES
    arrived: np.ndarray  # (S, C, max_presses + 1) bool


def _drive(scenes: Scenes, chains: list[str]) -> _Drives:
    S, C, T = len(scenes), len(chains), scenes.max_presses
    codes = np.array([[KEYS.index(key) for key in (chain + "w" * T)[:T]] for chain in chains],
                     dtype=np.int64).reshape(C, T)
    scene_of = np.repeat(np.arange(S), C)
    chain_of = np.tile(np.arange(C), S)
    side_of = scenes.right[scene_of].astype(np.int64)
    px, py = np.zeros(S * C), np.zeros(S * C)
    passed = np.full(S * C, -1)  # -1 not yet, 0 left, 1 right
    end_step, end_code = np.full(S * C, T + 1), np.full(S * C, -1)
    arrived = np.zeros((S * C, T + 1), bool)
    live = np.arange(S * C)
    for t in range(1, T + 1):
        s, side = scene_of[live], side_of[live]
        key = codes[chain_of[live], t - 1]
        mx, my = scenes.moves[side, key, 0], scenes.moves[side, key, 1]
        sx, sy = px[live], py[live]
        ex, ey = sx + mx, sy + my
        hit = _collides(scenes, s, key, sx, sy, mx, my)
        crossing = ~hit & (passed[live] == -1) & (ex > scenes.far_x[s])
        if crossing.any():
            passed[live[crossing]] = _crossing_side(scenes, s[crossing], key[crossing], sx[crossing],
                                                    sy[crossing], mx[crossing], my[crossing])
        side_passed = passed[live]
        code = np.full(len(live), -1)
        code[hit] = _ENDED["collision"]
        free = code == -1
        code[free & (side_passed >= 0) & (side_passed != side)] = _ENDED["wrong_side"]
        code[(code == -1) & ((np.abs(ey) > ARENA_HALF_WIDTH) | (ex < -ARENA_BEHIND))] = _ENDED["lost"]
        on_side = (code == -1) & (side_passed == side)
        if scenes.world == ENV_ID:
            reached = _within(on_side, ex, ey, scenes.target[s], SUCCESS_RADIUS)
            code[reached] = _ENDED["success"]
        if t >= T:
            code[code == -1] = _ENDED["timeout"]
        ended = code >= 0
        end_step[live[ended]], end_code[live[ended]] = t, code[ended]
        px[live], py[live] = ex, ey
        if scenes.world != ENV_ID:
            arrived[live, t] = (code == -1) & _arrives(on_side, ex, ey, scenes.target[s])
        live = live[~ended]
        if not len(live):
            break
    return _Drives(end_step.reshape(S, C), end_code.reshape(S, C), arrived.reshape(S, C, T + 1))


def _samples(scenes: Scenes, key: np.ndarray, sx, sy, mx, my):
    """The positions geometry.sweep checks along each press, grouped by how many it checks."""
    for steps in np.unique(scenes.steps[key]):
        rows = np.flatnonzero(scenes.steps[key] == steps)
        fraction = np.arange(1, steps + 1) / steps  # k / steps, as sweep computes it
        yield rows, sx[rows, None] + mx[rows, None] * fraction, sy[rows, None] + my[rows, None] * fraction


def _collides(scenes: Scenes, s, key, sx, sy, mx, my) -> np.ndarray:
    """Whether each press touches a box or the back wall, judged as geometry.sweep judges it;
    only presses whose bounding box comes near one are sampled."""
    x_lo, x_hi = np.minimum(sx, sx + mx), np.maximum(sx, sx + mx)
    y_lo, y_hi = np.minimum(sy, sy + my), np.maximum(sy, sy + my)
    boxes = scenes.boxes[s]  # (L, 2, 4)
    gap_x = np.maximum(np.maximum(boxes[..., 0] - x_hi[:, None], 0.0), x_lo[:, None] - boxes[..., 1])
    gap_y = np.maximum(np.maximum(boxes[..., 2] - y_hi[:, None], 0.0), y_lo[:, None] - boxes[..., 3])
    reach = ROBOT_RADIUS + 1e-6
    near = ((gap_x ** 2 + gap_y ** 2) < reach * reach).any(1) | (x_hi + reach >= WALL_X)
    hit = np.zeros(len(sx), bool)
    rows = np.flatnonzero(near)
    if not len(rows):
        return hit
    radius_sq = ROBOT_RADIUS * ROBOT_RADIUS
    for sub, xs, ys in _samples(scenes, key[rows], sx[rows], sy[rows], mx[rows], my[rows]):
        touched = (xs + ROBOT_RADIUS >= WALL_X).any(1)
        for b in range(boxes.shape[1]):
            x0, x1, y0, y1 = (boxes[rows[sub], b, i, None] for i in range(4))
            dx = np.maximum(np.maximum(x0 - xs, 0.0), xs - x1)
            dy = np.maximum(np.maximum(y0 - ys, 0.0), ys - y1)
            touched |= (dx * dx + dy * dy < radius_sq).any(1)
        hit[rows[sub]] = touched
    return hit


def _crossing_side(scenes: Scenes, s, key, sx, sy, mx, my) -> np.ndarray:
    """0 (left) or 1 (right): where the first sampled position past the far edge stands."""
    side = np.zeros(len(sx), np.int64)
    for rows, xs, ys in _samples(scenes, key, sx, sy, mx, my):
        first = np.argmax(xs > scenes.far_x[s[rows], None], axis=1)
        side[rows] = np.where(ys[np.arange(len(rows)), first] > scenes.mid_y[s[rows]], 0, 1)
    return side


def _within(mask, x, y, target, radius) -> np.ndarray:
    """v0's success circle, as math.dist judges it."""
    distance = np.hypot(x - target[:, 0], y - target[:, 1])
    inside = mask & (distance <= radius)
    for i in np.flatnonzero(mask & (np.abs(distance - radius) < NEAR)):
        inside[i] = math.dist((x[i], y[i]), tuple(target[i])) <= radius
    return inside


def _arrives(mask, x, y, target) -> np.ndarray:
    """v1's arrival, as varied.arrival judges it."""
    dx, dy = target[:, 0] - x, target[:, 1] - y
    distance, bearing = np.hypot(dx, dy), np.abs(np.arctan2(dy, dx))
    low, high = varied.ARRIVAL_DISTANCE
    ok = mask & (distance >= low) & (distance <= high) & (bearing <= varied.ARRIVAL_BEARING)
    close = (np.abs(distance - low) < NEAR) | (np.abs(distance - high) < NEAR)
    close |= np.abs(bearing - varied.ARRIVAL_BEARING) < NEAR
    for i in np.flatnonzero(mask & close):
        ok[i] = varied.arrival((float(x[i]), float(y[i])), tuple(target[i])) is None
    return ok


def _split(scenes: Scenes, sequences: list[str]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Each sequence as (chain, presses before its stop): distinct chains, chain index and stop press
    per sequence (max_presses + 1 for none). Only v1 stops; trailing 'w' is the chain's own tail."""
    T, chains, index, chain_of, stop_at = scenes.max_presses, [], {}, [], []
    stops = _stop_keys() if scenes.world != ENV_ID else ""
    for keys in sequences:
        stop = min((keys.find(key) for key in stops if key in keys), default=T + 1)
        keys = keys[:stop]
        chain = keys[:T].rstrip("w")
        chain_of.append(index.setdefault(chain, len(index)))
        stop_at.append(min(stop, T + 1))
    chains = sorted(index, key=index.get)
    return chains, np.array(chain_of, np.int64), np.array(stop_at, np.int64)


def outcome_codes(scenes: Scenes, sequences: list[str]) -> np.ndarray:
    """(scenes, sequences) indices into env.OUTCOMES: how each left-form sequence, played by a
    KeyScript (mirrored for a right-side scene, then 'w' for good), ends in each scene."""
    chains, chain_of, stop_at = _split(scenes, sequences)
    drives = _drive(scenes, chains)
    end_step, end_code = drives.end_step[:, chain_of], drives.end_code[:, chain_of]
    stop = np.minimum(stop_at, scenes.max_presses)
    arrived = drives.arrived[:, chain_of, stop]
    stopped = np.where(arrived, _ENDED["success"], _ENDED["stopped_away"])
    return np.where(end_step <= stop_at[None, :], end_code, stopped)


def outcomes(scenes: Scenes, sequences: list[str]) -> np.ndarray:
    """As outcome_codes, as outcome names."""
    return np.array(OUTCOMES)[outcome_codes(scenes, sequences)]


def score_families(world: str, plan: list[tuple[int, str]]) -> dict[Candidate, float]:
    """Every searched sequence of `world` with its success rate over `plan`."""
    candidates = families(world)
    codes = outcome_codes(scenes_of(world, plan), [c.keys for c in candidates])
    rates = (codes == _ENDED["success"]).mean(axis=0)
    return {candidate: float(rate) for candidate, rate in zip(candidates, rates)}


def best_of(scores: dict[Candidate, float]) -> Candidate:
    """The highest success; ties go to the shorter sequence, then to the earlier family and parameters."""
    order = {candidate: i for i, candidate in enumerate(scores)}
    return min(scores, key=lambda c: (-scores[c], len(c.keys), order[c]))


def search_best_blind(world: str, seed: int = SEARCH_SEED, episodes: int = SEARCH_EPISODES) -> BlindSearch:
    """The best sequence of the families over plan(episodes, seed)."""
    from .rollout import plan  # here, not at the top: controllers may import this module

    scores = score_families(world, plan(episodes, seed))
    best = best_of(scores)
    return BlindSearch(world, best.keys, best.family, best.params, scores[best], len(scores), seed, episodes)


@lru_cache(maxsize=None)
def best_blind(world: str = ENV_ID) -> BlindSearch:
    """search_best_blind(world), searched once per process."""
    return search_best_blind(world)


class BestBlind(KeyScript):
    """Knows the side from the instruction and nothing else: plays the best searched sequence of the
    episode's world (reset info "world", else v0), mirrored for the right. The best a driver that
    ignores the image can do among the families."""

    needs_image = False

    def keys_for(self, instruction: str, info: dict) -> str:
        side = side_of_instruction(instruction)
        if side is None:
            raise ValueError(f"instruction {instruction!r} names no single side (left or right)")
        return left_to_side(best_blind(info.get("world", ENV_ID)).keys, side)
