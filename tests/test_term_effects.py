"""tools/world/term_effects.py: the per-term split of an edit adds up to the latent's actual change."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools" / "world"))
import eval_world  # noqa: E402
import term_effects  # noqa: E402

from gas_lightning.loading import load_backbone  # noqa: E402
from gas_lightning.worlds import MODEL_DIR, held_out_cases  # noqa: E402


def _args(steps):
    return eval_world.parser().parse_args(["--seed", "3", "--masks", "same_outline", "--steps", str(steps)])


def test_the_terms_effects_sum_to_the_latents_change():
    backbone = load_backbone(str(MODEL_DIR), device="cpu", attention="sdpa")
    case = held_out_cases(2, seed=3)[1]  # two recolours and a background change
    for name in ("gas", "gas_sequential"):
        method = eval_world.METHODS[name]
        module, callbacks = eval_world.case_module(backbone, case, method, _args(4))
        effects = term_effects.attach(module)
        eval_world.edit_case(backbone, case, method, _args(4), ready=(module, callbacks))
        assert len(effects) == len(module.terms) == 3
        change = module.latent.detach() - module.z_src  # what the optimiser actually did
        assert change.abs().max() > 1e-3
        torch.testing.assert_close(sum(effects.values()), change, rtol=1e-4, atol=1e-5)


def test_the_command_prints_every_object_and_term(capsys):
    assert term_effects.main(["--seed", "3", "--case", "1", "--steps", "2", "--masks", "same_outline"]) == 0
    out = capsys.readouterr().out
    assert "object 0: purple square -> green square" in out and "object 1: purple circle -> green circle" in out
    assert "background: snow -> sky" in out and out.count("subtask2_snow") == 3


def test_the_split_by_timestep_adds_up_to_each_terms_change():
    backbone = load_backbone(str(MODEL_DIR), device="cpu", attention="sdpa")
    case = held_out_cases(2, seed=3)[1]
    method = eval_world.METHODS["gas"]
    module, callbacks = eval_world.case_module(backbone, case, method, _args(6))
    by_t: dict = {}
    effects = term_effects.attach(module, by_t, 300)
    eval_world.edit_case(backbone, case, method, _args(6), ready=(module, callbacks))
    assert {lo for _, lo in by_t} <= {0, 300, 600, 900}
    for name, total in effects.items():
        parts = [v for (n, _), v in by_t.items() if n == name]
        assert sum(len(p[1]) for p in parts) == 6  # one draw per step
        torch.testing.assert_close(sum(p[0] for p in parts), total, rtol=1e-5, atol=1e-6)
        assert all(g >= 0 for p in parts for g in p[1] + p[2])


def test_the_command_prints_the_split_by_timestep(capsys):
    assert (
        term_effects.main(["--seed", "3", "--case", "1", "--steps", "3", "--masks", "same_outline", "--by_t", "500"])
        == 0
    )
    out = capsys.readouterr().out
    assert "text gap" in out and ("t    0- 499" in out or "t  500- 999" in out)
