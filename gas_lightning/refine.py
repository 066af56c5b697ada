"""The plan of one refine pass: what failed runs again, harder; what passed is held where it is.

A refine pass starts from the edited latent and also takes it as its reference (the DDS source
branch and the keep terms read it), so a subtask judged done becomes a keep term of its target
phrase ("a blue circle" -> "a blue circle"), which pulls its region back to the result it reached.
A subtask not judged done (not done or unsure) runs again from its source phrase with its intensity
multiplied by `boost` per pass it has failed, capped at the plan's maximum, and from the source: where
its mask owns the image (`reset_region`) the pass's start and reference are the source latent again.
Continued from a failed result instead, the source phrase's object is often no longer in the reference
(erased into the ground), and the DDS difference has nothing to compare it with: on validation seed 12
(user requests) that version repaired none of the four failed cases.

A keep subtask judged not done (a kept object the edit erased, e.g. into a changed background) is
restored the same way: its region restarts from the source and its keep term runs again, boosted.
Without this a lost object stays lost, since the pass's reference is the result it was lost in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from gas_lightning.callbacks.previews import save_png
from gas_lightning.checking import Verdict
from gas_lightning.plan import EditPlan

MAX_INTENSITY = 10.0  # Subtask's own bound


def failed(plan: EditPlan, verdicts: Sequence[Verdict]) -> list[int]:
    """The edit subtasks to run again: every one not judged done (keep and switched-off subtasks never are)."""
    return [v.index for v in verdicts if not v.keep and not v.passed and plan.subtasks[v.index].intensity > 0]


def lost(plan: EditPlan, verdicts: Sequence[Verdict]) -> list[int]:
    """The keep subtasks whose object the edit did not keep (not judged done): restored from the source."""
    return [v.index for v in verdicts if v.keep and not v.passed and plan.subtasks[v.index].intensity > 0]


def rerun(plan: EditPlan, verdicts: Sequence[Verdict]) -> list[int]:
    """Every subtask a refine pass runs again from the source: the failed edits and the lost kept objects."""
    return sorted(failed(plan, verdicts) + lost(plan, verdicts))


def refine_plan(
    plan: EditPlan, verdicts: Sequence[Verdict], boost: float, passes_failed: Sequence[int], restore: bool = True
) -> EditPlan:
    """`plan` (the user's) for the next pass; `passes_failed[k]` counts the passes subtask k failed so far.
    `restore`: also boost the lost kept objects' terms (only a pass that restarts them from the source can)."""
    again = set(rerun(plan, verdicts) if restore else failed(plan, verdicts))
    subtasks = []
    for k, s in enumerate(plan.subtasks):
        if s.intensity == 0 or (s.keep and k not in again):  # a switched-off subtask stays off; kept stays kept
            subtasks.append(s)
        elif k in again:
            subtasks.append(replace(s, intensity=min(MAX_INTENSITY, s.intensity * boost ** passes_failed[k])))
        else:  # done: held at its result; its own penalty/preserve-form settings no longer apply
            subtasks.append(replace(s, source=s.target, preserve_form=False, penalty=None))
    return plan.replace_subtasks(subtasks)


def reset_region(terms, again: Sequence[int]):
    """(h, w) weights of where a pass restarts from the source: the places a failed subtask's mask owns
    (its weight there is at least every other subtask's), at that weight; 0 elsewhere."""
    import torch

    masks = [t.mask for t in terms if not t.is_full]
    ran = torch.stack([masks[i] for i in again]).amax(0)
    rest = [m for i, m in enumerate(masks) if i not in again]
    held = torch.stack(rest).amax(0) if rest else torch.zeros_like(ran)
    return torch.where(ran >= held, ran, torch.zeros_like(ran))


def pass_config(cfg, parser, steps: int, seed: int):
    """The config of a refine pass: its own steps and seed; a cosine schedule sized to the first pass
    (T_max = max_steps) is resized to the pass, so each pass decays its learning rate to the end."""
    rcfg = cfg.clone()
    rcfg.trainer.max_steps, rcfg.seed = steps, seed
    init = getattr(rcfg.lr_scheduler, "init_args", None)
    if init is not None and getattr(init, "T_max", None) == cfg.trainer.max_steps:
        init.T_max = steps
    return rcfg, parser.instantiate(rcfg)


def judge(checker, source, edited, plan: EditPlan, out) -> list[Verdict]:
    """The checker's verdicts; a checker that fails says so and that the edit itself is saved."""
    from gas_lightning.errors import GasError, RunError

    saved = f"the edit itself is saved in {out / 'edited.png'}"
    try:
        return checker(source, edited, plan)
    except GasError as e:
        raise type(e)(f"{e}; {saved}") from None
    except Exception as e:
        raise RunError(
            f"checking the edit failed ({type(e).__name__}: {' '.join(str(e).split())[:200]}); {saved}"
        ) from None


def check_and_refine(cfg, parser, image, module, trainer, result, checker, lpips, backbone, callbacks):
    """Check the finished first pass, run up to --refine passes of what failed, write and log the report.

    Every pass writes edited.png and its checkpoints before it is checked, so a failed check or a
    stopped pass never loses a finished result. Returns `result` with the last pass's image, latent,
    the steps of all passes and the report.
    """
    import lightning as L
    import torch

    from gas_lightning.checking import CheckSpec, counts
    from gas_lightning.fitting import build_pass, fit, make_trainer
    from gas_lightning.pipeline import tensor_to_image
    from gas_lightning.report import build_report, log_report, preservation, report_picture, write_report

    check = CheckSpec(**{k: cfg[k] for k in CheckSpec.__dataclass_fields__})
    out, plan = result.output_dir, result.plan
    source_latent = module.z_src.detach().clone()
    source = tensor_to_image(module.decode(source_latent).cpu())  # what the edit saw, at the working size
    edited, latent, total = result.image, result.latent, result.steps

    def record(k, steps, seed, rerun, verdicts, pass_plan=None):
        entry = {"pass": k, "steps": steps, "seed": seed, "rerun": rerun, "counts": counts(verdicts)}
        entry["verdicts"] = [v.to_dict() for v in verdicts]
        return entry if pass_plan is None else {**entry, "plan": pass_plan.to_dict()}

    def report_on(verdicts, logger):
        preserved, leak = preservation(source, edited, plan, *lpips)
        report = build_report(checker.name, verdicts, preserved, passes)
        picture = report_picture(source, edited, leak, report)
        write_report(report, picture, out)
        log_report(logger, report, picture, total)
        return report

    verdicts = judge(checker, source, edited, plan, out)
    passes = [record(0, result.steps, cfg.seed, None, verdicts)]
    report = report_on(verdicts, trainer.logger)
    times_failed = [0] * len(plan.subtasks)
    steps = check.refine_steps or max(1, cfg.trainer.max_steps // 2)
    for k in range(1, check.refine + 1):
        again = rerun(plan, verdicts)
        if not again:
            break
        if k == 1:  # the first pass's picture stays beside the refined one (edited.png is overwritten)
            save_png(edited, out / "edited_pass0.png")
        for i in again:
            times_failed[i] += 1
        pass_plan = refine_plan(plan, verdicts, check.refine_boost, times_failed)
        rcfg, rinit = pass_config(cfg, parser, steps, cfg.seed + 1000 * k)
        L.seed_everything(rcfg.seed, workers=True, verbose=False)
        rmodule = build_pass(backbone, image, pass_plan, rcfg, rinit)
        with torch.no_grad():  # continue from the result, the failed regions from the source; hold it as reference
            region = reset_region(rmodule.terms, again).to(rmodule.latent)
            start = latent.to(rmodule.latent) * (1 - region) + source_latent.to(rmodule.latent) * region
            rmodule.latent.copy_(start)
            rmodule.z_src.copy_(start)
        rtrainer, final = make_trainer(
            rcfg, rinit, out, out / "checkpoints" / f"refine{k}", callbacks, f"refine{k}", source_latent
        )
        fit(rtrainer, rmodule, final, out)
        edited, latent = tensor_to_image(rmodule.decode().cpu()), rmodule.latent.detach().cpu()
        total += rtrainer.global_step
        verdicts = judge(checker, source, edited, plan, out)
        passes.append(record(k, rtrainer.global_step, rcfg.seed, again, verdicts, pass_plan))
        report = report_on(verdicts, rtrainer.logger)
    result.image, result.latent, result.steps, result.report = edited, latent, total, report
    return result
