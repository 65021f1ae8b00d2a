"""lgd: learnability-guided incremental distillation (seed 000, CVPR 2026).

The distilled set D grows in increments of `increment` IPC (the last one holds what is left of the run's
IPC). Increment 0 is a seed set (another method's output, default dit); then for i = 1 .. K−1:
  1. train θ_{i−1} on D_{i−1} (a training job);
  2. sample κ candidates per new slot, guided on  S(x, y) = L(θ_{i−1}, x, y) − ω·L(θ*, x, y)  (λ, window
     t ∈ [10, 45] of 50, ρ_t normalisation) plus deviation away from the most cosine-similar latent of
     the class in the memory buffer M (γ) — one objective, raydd.objectives.learnability;
  3. keep the candidate with the highest S per slot (top-κ; S scored on the actors) and merge: D_i = D_{i−1} ∪ I_i.
The driver holds no image: D_{i−1} stays in its written stage and I_i in the candidates' unit files (StagedSet rows),
and D_i is written a class at a time (SetUnion).
The memory is sequential as in IGD: an increment's slots are sampled in `memory_rounds` rounds, and the
samples a round keeps join M (= D_{i−1} at the first round) before the next round is sampled.
θ* is a reference classifier trained once on the full real train split (cached like the teachers).
Each D_i is written under ctx.scratch (its manifest, with the increment index, last): a
re-run with the same run name resumes after the last finished increment.
"""
from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from raydd.config import ConfigError, config_hash
from raydd.data import DataError
from raydd.generate import DistilledSet, SetUnion, StagedSet
from raydd.methods import get_method, register_method
from raydd.objectives.learnability import (LearnabilityScores, LearnabilityState, learnability_objective, memory_term,
                                           rank_in_class, top_kappa)
from raydd.outputs import read_distilled, write_distilled, written_set
from raydd.protocols import epochs_for, to_float
from raydd.sampling import Guidance, warn_guidance_scheduler
from raydd.selection import load_selector


@dataclass
class Config:
    lam: float = 0.5              # λ: learnability guidance scale. The paper's 15 was set for the LGD summary's ρ_t;
                                  #   under IGD's variance-scaled step (sampler.guidance_norm's default) 0.5 raises S
                                  #   with samples intact on digits-latent, 1 bends them (README)
    omega: float = 0.5            # ω: weight of the reference loss L(θ*, x, y) in S
    gamma: float = 1.667          # γ: deviation (memory) guidance weight; enters the objective as γ/λ (the paper's
                                  #   γ/λ = 50/15)
    kappa: int = 3                # κ: candidates drawn per slot; the one with the highest S is kept
    increment: int = 10           # IPC added per increment (the paper: 10); the last increment may be smaller
    seed_ipc: int = 0             # IPC of the seed set (0 = one increment, at most the run's IPC; the paper: 10)
    seed_method: str = "dit"      # registered method that makes the seed set (the paper uses IGD)
    seed_path: str = ""           # or an existing set: our output dir (parquet) or an ImageFolder
    window_lo: int = 10           # guidance window t ∈ [window_lo, window_hi] of `window_of` steps
    window_hi: int = 45           #   (i = 0 cleanest), mapped to sampler.steps proportionally
    window_of: int = 50
    mode: str = "full"            # guidance gradient: "full" (through the DiT) | "x0" (eps constant)
    arch: str = "convnet_d3"      # architecture of θ* and of every θ_{i−1}
    reference_epochs: int = 0     # θ* epochs on the real train split (0 = eval.teacher_epochs)
    model_epochs: int = 0         # θ_{i−1} epochs (0 = the eval protocol's epochs for D_{i−1}'s IPC)
    memory_rounds: int = 0        # rounds per increment, each round's kept samples join M before the next
                                  #   (0 = one per slot: IGD's sequential memory; 1 = M stays D_{i−1})


def check(cfg: Config, run) -> None:
    """Allowed values, and a seed set within the run's IPC (called by the registry before anything starts)."""
    from raydd.students import list_students

    if cfg.increment < 1 or cfg.kappa < 1 or cfg.memory_rounds < 0 or cfg.seed_ipc < 0:
        raise ConfigError("lgd.increment and lgd.kappa must be >= 1, lgd.memory_rounds and lgd.seed_ipc >= 0")
    ipc, seed_ipc = run.ipc, increments(cfg, run.ipc)[0]
    problems = [
        (seed_ipc <= ipc, f"lgd.seed_ipc={seed_ipc} is larger than ipc={ipc}; allowed: 1 .. {ipc} (0 = one increment)"),
        (cfg.mode in ("full", "x0"), f"lgd.mode={cfg.mode!r}; allowed: full, x0"),
        (0 <= cfg.window_lo <= cfg.window_hi < cfg.window_of,
         "need 0 <= lgd.window_lo <= lgd.window_hi < lgd.window_of"),
        (cfg.arch in list_students(), f"lgd.arch={cfg.arch!r}; allowed: {', '.join(list_students())}"),
        (cfg.seed_method != "lgd", "lgd.seed_method cannot be lgd itself"),
    ]
    for ok, msg in problems:
        if not ok:
            raise ConfigError(msg)
    warn_guidance_scheduler("lgd", run.sampler)
    if ipc == seed_ipc:     # the paper grows IPC 10 -> 20, 30, ...: at the seed's IPC nothing is guided
        hint = f"e.g. lgd.seed_ipc={ipc // 2} lgd.increment={ipc - ipc // 2}" if ipc > 1 else "IPC 1 is a seed alone"
        warnings.warn(f"lgd at ipc={ipc} = lgd.seed_ipc: no guided increment, the set is {cfg.seed_method}'s ({hint})")
    if not cfg.seed_path:
        get_method(cfg.seed_method)  # unknown names fail here with the list of methods
    elif not Path(cfg.seed_path).expanduser().is_dir():
        raise ConfigError(f"lgd.seed_path={cfg.seed_path} is not a directory")


def increments(cfg: Config, ipc: int) -> tuple[int, list[int]]:
    """The seed set's IPC (0 = one increment, at most `ipc`) and the IPC added by increments 1 .. K−1: `increment`
    each, the last one what is left (ipc 10, seed_ipc 3, increment 4 -> 3, [4, 3])."""
    seed_ipc = cfg.seed_ipc or min(cfg.increment, ipc)
    full, rest = divmod(ipc - seed_ipc, cfg.increment)
    return seed_ipc, [cfg.increment] * full + ([rest] if rest else [])


def respaced_window(cfg: Config, steps: int) -> tuple[int, int]:
    """The paper's window [10, 45] of 50 steps -> the same fraction of `steps` respaced steps."""
    scale = steps / cfg.window_of
    return min(steps - 1, round(cfg.window_lo * scale)), min(steps - 1, round(cfg.window_hi * scale))


# --- models: θ* (reference, cached) and θ_{i−1} (one training job per increment) -------------------
def train_reference(ctx, cfg: Config) -> Path:
    """θ*: a hard-label classifier on the full real train split; shares the teachers' cache."""
    return ctx.real_classifier(cfg.arch, cfg.reference_epochs)


def train_theta(ctx, cfg: Config, set_dir: Path, ipc: int, dst: Path) -> tuple[Path, dict]:
    """θ_{i−1} on D_{i−1}, kept as `dst` (reused when it exists), and its job's metrics: "eval_acc", its top-1 on
    eval.split, measured in the job (streamed there with a store)."""
    return ctx.set_classifier(set_dir, cfg.arch, cfg.model_epochs or epochs_for(ipc, ctx.cfg.eval), dst, evaluate=True)


# --- the guidance: built once per sampling actor from checkpoint paths (picklable) -----------------
def learnability_guidance(backbone, device, *, theta: str, reference: str, memory: str, arch: str, num_classes: int,
                          channels: int, image_size: int, class_ids: list[int], lam: float, omega: float,
                          gamma: float, window: tuple[int, int], mode: str) -> Guidance:
    mem = read_distilled(memory)
    latents = mem.latents if mem.latents is not None else torch.cat(   # a real-image seed set: encode it once
        [backbone.vae.encode(to_float(b).to(device)).cpu() for b in mem.images.split(64)])
    state = LearnabilityState(
        model=load_selector(theta, arch, num_classes, channels, image_size, device),
        reference=load_selector(reference, arch, num_classes, channels, image_size, device),
        omega=omega, diversity=gamma / lam if lam else 0.0, memory=latents.float().to(device),  # [M, c, h, w]
        memory_labels=mem.labels.to(device), class_ids=torch.tensor(class_ids, device=device))
    return Guidance(learnability_objective, scale=lam, window=window, mode=mode, on_images=True, state=state,
                    latent_term=memory_term if gamma else None)


# --- stages: D_i under ctx.scratch, one complete directory per finished increment ------------------
def save_stage(work: Path, i: int, ds, class_names: list[str], fingerprint: str) -> Path:
    path = write_distilled(ds, work / f"stage-{i:03d}", class_names,       # manifest last: complete or absent
                           extra={"increment": i, "fingerprint": fingerprint})
    for old in work.glob("stage-[0-9][0-9][0-9]"):                         # earlier stages are superseded
        if int(old.name.split("-")[1]) < i:
            shutil.rmtree(old, ignore_errors=True)
    return path


def last_stage(work: Path, fingerprint: str) -> tuple[int, Path] | None:
    """The last finished increment of this configuration (index, directory), or None."""
    done = []
    for d in work.glob("stage-[0-9][0-9][0-9]"):
        m = d / "manifest.json"
        if m.exists() and json.loads(m.read_text()).get("fingerprint") == fingerprint:
            done.append((int(d.name.split("-")[1]), d))
    return max(done) if done else None


def seed_set(ctx, cfg: Config, seed_ipc: int) -> DistilledSet | StagedSet:
    """Increment 0: another registered method's output, or an existing set read from disk (its first seed_ipc slots
    per class; of our output, only their labels until they are written)."""
    if cfg.seed_path:
        from raydd.redundancy import load_with_slots

        root = Path(cfg.seed_path).expanduser()
        if (root / "manifest.json").exists():
            ds = written_set(root)                                           # ours: real slots, latents
        else:                                                                # any ImageFolder: file-name order
            ds = DistilledSet(*load_with_slots(root, ctx.data.class_names, ctx.cfg.data.image_size,
                                               ctx.cfg.data.channels))
    else:
        ds = ctx.run_method(cfg.seed_method, seed_ipc)
    counts = torch.bincount(ds.labels, minlength=ctx.data.num_classes)
    if int(counts.min()) < seed_ipc:
        raise DataError(f"the seed set has {int(counts.min())} images in class {int(counts.argmin())}; "
                         f"lgd needs {seed_ipc} per class")
    ds = ds.sorted()
    rank = rank_in_class(ds.labels)                                          # position in class, slot order
    keep = torch.nonzero(rank < seed_ipc).flatten()
    return ds.subset(keep, slots=rank[keep],
                     scores=torch.full((len(keep),), float("nan")) if ds.scores is None else ds.scores[keep])


@torch.no_grad()
def ce_sum(model, ds, batch_size: int = 256) -> tuple[float, int]:
    """(summed cross-entropy of `model`, number of images) on a set, a class at a time (clean images)."""
    total, n = 0.0, 0
    for _, part in ds.classes():
        for k in range(0, len(part), batch_size):
            total += float(F.cross_entropy(model(to_float(part.images[k:k + batch_size])),
                                           part.labels[k:k + batch_size], reduction="sum"))
        n += len(part)
    return total, n


def candidate_rows(ctx, cfg: Config, i: int, n: int) -> dict[str, np.ndarray]:
    """κ independent draws (streams) of n slots per class; candidate k of slot j is row slot k·n + j."""
    parts = []
    for k in range(cfg.kappa):
        r = ctx.rows(per_class=n, stream=f"lgd-increment{i}-candidate{k}")
        r["slot"] = r["slot"] + k * n
        r["unit"] = r["unit"] + (int(parts[-1]["unit"].max()) + 1 if parts else 0)
        parts.append(r)
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


@register_method("lgd", Config, check=check)
def run(ctx, cfg: Config):
    d, (seed_ipc, sizes) = ctx.cfg.data, increments(cfg, ctx.cfg.ipc)
    fingerprint = config_hash(asdict(cfg), ctx.cfg.seed, ctx.cfg.data, ctx.cfg.backbone, ctx.cfg.sampler,
                              ctx.cfg.eval, ctx.cfg.methods.get(cfg.seed_method, {}))
    work = Path(ctx.scratch) / "lgd"
    work.mkdir(parents=True, exist_ok=True)
    classify = dict(arch=cfg.arch, num_classes=ctx.data.num_classes, channels=d.channels, image_size=d.image_size)
    reference = train_reference(ctx, cfg)                                    # θ*

    resumed = last_stage(work, fingerprint)
    if resumed is None:
        resumed = (0, save_stage(work, 0, seed_set(ctx, cfg, seed_ipc), ctx.data.class_names, fingerprint))
    else:
        print(f"[lgd] resuming after increment {resumed[0]} ({resumed[1]})", flush=True)
    done, stage = resumed
    current = written_set(stage)                                             # D_{i−1}: its labels, no images
    for i in range(done + 1, 1 + len(sizes)):
        have, n = seed_ipc + sum(sizes[:i - 1]), sizes[i - 1]                # IPC of D_{i−1}, IPC added now
        theta_path, theta_fit = train_theta(ctx, cfg, stage, have, work / f"theta-{i - 1:03d}-{fingerprint}.safetensors")
        theta = load_selector(theta_path, **classify)                        # θ_{i−1}
        scorer = dict(theta=str(theta_path), reference=str(reference), omega=cfg.omega, **classify, **ctx.actor_resources())
        factory = partial(learnability_guidance, theta=str(theta_path), reference=str(reference),
                          class_ids=ctx.spec.class_ids, lam=cfg.lam, omega=cfg.omega, gamma=cfg.gamma,
                          window=respaced_window(cfg, ctx.cfg.sampler.steps), mode=cfg.mode, **classify)
        rows, memory, new = candidate_rows(ctx, cfg, i, n), stage, None      # κ·n candidates per class
        rounds = min(cfg.memory_rounds or n, n)
        for r, js in enumerate(np.array_split(np.arange(n), rounds)):        # sequential memory: slots js
            mine = np.isin(rows["slot"] % n, js)
            cands = ctx.generate({k: v[mine] for k, v in rows.items()}, partial(factory, memory=str(memory)))
            s = torch.from_numpy(ctx.map_rows(LearnabilityScores, scorer,                          # S, on the actors
                                              {"class_idx": cands.labels.numpy(), **cands.image_columns()})["S"])
            keep = torch.from_numpy(top_kappa(s, (cands.labels * n + cands.slots % n).numpy()))
            kept = cands.subset(keep, slots=have + cands.slots[keep] % n, scores=s[keep])   # rows, nothing read
            new = kept if new is None else SetUnion(new, kept)
            if r < rounds - 1:                                                # M ← M ∪ kept, for the next round
                memory = write_distilled(SetUnion(current, new), work / f"memory-{i:03d}", ctx.data.class_names)
        (ce_old, n_old), (ce_new, n_new) = ce_sum(theta, current), ce_sum(theta, new)
        ctx.log_metrics({"lgd/ipc": have + n,
                         "lgd/theta_acc": theta_fit.get("eval_acc", float("nan")),  # θ_{i−1} on eval split
                         "lgd/loss_new": ce_new / n_new,                                  # L(θ_{i−1}, I_i)
                         "lgd/loss_jump": (ce_old + ce_new) / (n_old + n_new) - ce_old / n_old,  # the loss spike
                         "lgd/score_kept": float(new.scores.mean())}, step=i)
        stage = save_stage(work, i, SetUnion(current, new), ctx.data.class_names, fingerprint)   # D_i, class by class
        current = written_set(stage)
    return current
