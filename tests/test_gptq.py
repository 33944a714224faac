"""gptq.py: GPTQ onto the student's own grids, against a float64 reference; the GPTQ start in train.py."""

import dataclasses
import json

import pytest
import torch

import train
from test_train import fresh_accelerate_state, tiny_args  # noqa: F401 (an autouse fixture)
from gptq import GroupGrid, apply_gptq, gptq_quantize
from quant import FakeQuantLinear, fake_quantize, quantize_model

FORMATS = [("mxfp4", 32, "floor"), ("mxfp4", 32, "mse"), ("mxfp4", 32, "rceil"), ("int4_sym", 64, "floor"),
           ("int4", 64, "floor"), ("int4", 32, "floor"), ("nvfp4", 16, "floor")]
# the formats whose GPTQ also runs in natural order and with an unrounded latent (nvfp4 fixes its grids first)
FREE_GRID_FORMATS = [f for f in FORMATS if f[0] != "nvfp4"]


def correlated_inputs(tokens: int, width: int, seed: int) -> torch.Tensor:
    """Calibration inputs with correlated channels and a few outlier channels, as activations have."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, width, generator=g) @ (torch.eye(width) + 0.3 * torch.randn(width, width, generator=g))
    x[:, :3] *= 10
    return x


def reference_gptq(weight, hessian, quant_type, group_size, scale_rule, actorder, damping=0.01):
    """GPTQ as the paper writes it, in float64: column by column, every update applied at
    once to all later columns (no blocks), H^-1 updated by explicit elimination. With
    ``actorder`` the columns go by decreasing H diagonal, each group's grid taken from the
    unquantized weights; otherwise in natural order, each grid from the updated weights."""
    w = weight.double().clone()
    h = hessian.double().clone()
    dead = h.diagonal() == 0
    order = torch.argsort(h.diagonal(), descending=True, stable=True) if actorder else torch.arange(w.shape[1])
    h[dead, dead] = 1.0
    w[:, dead] = 0
    h.diagonal().add_(damping * h.diagonal().mean())
    h_inv = torch.linalg.inv(h)
    tensor_amax = w.abs().amax().float()  # nvfp4's tensor scale, from the weights GPTQ starts from
    grids = {g: GroupGrid(w[:, g:g + group_size].float(), quant_type, scale_rule, tensor_amax)
             for g in range(0, w.shape[1], group_size)} if actorder else {}
    values = torch.empty_like(w)
    for column in order.tolist():
        first = column - column % group_size
        if first not in grids:
            grids[first] = GroupGrid(w[:, first:first + group_size].float(), quant_type, scale_rule)
        q = grids[first].quantize(w[:, column].float(), column % group_size).double()
        values[:, column] = q
        error = (w[:, column] - q) / h_inv[column, column]
        w -= error[:, None] * h_inv[column, :][None, :]  # zero on the columns already quantized
        # remove the quantized column from the inverse Hessian (Gaussian elimination, OBS)
        h_inv = h_inv - torch.outer(h_inv[:, column], h_inv[column, :]) / h_inv[column, column]
    return values


@pytest.mark.parametrize("quant_type,group_size,scale_rule,actorder",
                         [(*f, True) for f in FORMATS] + [(*f, False) for f in FREE_GRID_FORMATS])
def test_gptq_equals_a_float64_reference_of_the_update(quant_type, group_size, scale_rule, actorder):
    torch.manual_seed(0)
    weight = torch.randn(24, 256) * 0.05
    x = correlated_inputs(600, 256, seed=1)
    hessian = x.T @ x
    _, values = gptq_quantize(weight, hessian, quant_type, group_size, scale_rule, block_size=64, actorder=actorder)
    expected = reference_gptq(weight, hessian, quant_type, group_size, scale_rule, actorder)
    torch.testing.assert_close(values.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("quant_type,group_size,scale_rule", FORMATS)
@pytest.mark.parametrize("magnitude", [1e-3, 1.0, 1e3])
def test_the_latent_weight_fake_quantizes_to_gptq_values(quant_type, group_size, scale_rule, magnitude):
    torch.manual_seed(2)
    weight = torch.randn(32, 128) * magnitude
    weight[0, :group_size] = 0  # an all-zero group
    weight[1, :group_size] = 0.5 * magnitude  # a constant group
    x = correlated_inputs(400, 128, seed=3)
    x[:, 5] = 0  # an input never seen: a dead column
    latent, values = gptq_quantize(weight, x.T @ x, quant_type, group_size, scale_rule)
    student = fake_quantize(latent, quant_type, group_size, scale_rule)
    if quant_type == "int4":  # scale and zero are recomputed from the latent extremes: equal up to float32
        # rounding, a millionth of the group's range, far below the code spacing (a 15th of it)
        groups = values.reshape(32, -1, group_size)
        spread = (groups.amax(-1) - groups.amin(-1) + groups.abs().amax(-1)).repeat_interleave(group_size, 1)
        assert ((student - values).abs() <= 1e-6 * spread).all()
    else:
        assert torch.equal(student, values)
    if quant_type != "int4":  # a dead column's weights are zeroed (int4's grid need not hold 0)
        assert torch.equal(values[:, 5], torch.zeros(32))


def test_an_nvfp4_latent_keeps_its_scales_where_the_largest_block_scale_rounds_down_to_224():
    """amax / 6 / t = 230 rounds to the E4M3 scale 224, so the GPTQ'd tensor's amax, 6 x 224 x t,
    halves the tensor scale: every block scale doubles exactly and the values stay GPTQ's."""
    torch.manual_seed(8)
    weight = torch.randn(16, 64) * 100
    weight[3, 7] = 6 * 230.0  # t = 1
    x = correlated_inputs(300, 64, seed=9)
    latent, values = gptq_quantize(weight, x.T @ x, "nvfp4", 16)
    assert latent.abs().amax() == 6 * 224.0
    assert torch.equal(fake_quantize(latent, "nvfp4"), values)


def test_an_all_zero_nvfp4_block_stays_zero_where_the_tensor_scale_halves():
    """A zero block's scale clamps at 2^-9: given codes by GPTQ's updates, they would double
    when the tensor scale halves (its scale stays clamped) and saturate at 6."""
    torch.manual_seed(10)
    t = 2.0 ** -12
    weight = torch.randn(64, 64) * (t * 2.0 ** -9 * torch.logspace(0, 2, 64))[:, None]  # near the smallest scale
    weight[:, :16] = 0  # a live all-zero block in every row
    weight[0] = 0
    weight[0, 20] = 6 * 230.0 * t  # the largest block scale rounds to 224: the student's tensor scale halves
    x = correlated_inputs(400, 64, seed=11)
    latent, values = gptq_quantize(weight, x.T @ x, "nvfp4", 16)
    assert torch.equal(values[:, :16], torch.zeros(64, 16))
    assert torch.equal(fake_quantize(latent, "nvfp4"), values)


def test_nvfp4_blocks_keep_their_largest_weight_at_code_6_even_with_a_subnormal_scale():
    """Round-to-nearest can give a block whose E4M3 scale is subnormal a largest code below 6
    (then its own values requantize to another scale); GPTQ's grid keeps it at +-6."""
    group = torch.zeros(2, 16)
    group[0, 0] = 6 * 1.5 * 2.0 ** -9  # scale 1.5 x 2^-9 rounds (half to even) to 2^-8: the weight is 4.5 codes
    group[1, 0] = -6.0 * 448  # sets the tensor scale to 1
    grid = GroupGrid(group, "nvfp4", "floor")
    assert fake_quantize(group, "nvfp4")[0, 0] == 4 * 2.0 ** -8
    assert grid.quantize(group[:, 0], 0).tolist() == [6 * 2.0 ** -8, -6.0 * 448]


@pytest.mark.parametrize("quant_type,group_size,scale_rule", FREE_GRID_FORMATS)
@pytest.mark.parametrize("magnitude", [1e-3, 1e3])
def test_an_unrounded_latent_gives_the_same_student_and_keeps_gptqs_margins(quant_type, group_size, scale_rule,
                                                                            magnitude):
    torch.manual_seed(6)
    weight = torch.randn(32, 128) * magnitude
    weight[0, :group_size] = 0
    x = correlated_inputs(400, 128, seed=7)
    rounded, values = gptq_quantize(weight, x.T @ x, quant_type, group_size, scale_rule)
    latent, same_values = gptq_quantize(weight, x.T @ x, quant_type, group_size, scale_rule, unrounded=True)
    assert torch.equal(same_values, values)
    assert torch.equal(fake_quantize(latent, quant_type, group_size, scale_rule),
                       fake_quantize(rounded, quant_type, group_size, scale_rule))
    # off the grid points nearly everywhere: what GPTQ's error-updated weights were
    assert (latent != values).float().mean() > 0.5


@pytest.mark.parametrize("quant_type,group_size,scale_rule", FORMATS)
def test_each_group_grid_is_the_student_quantizer_grid(quant_type, group_size, scale_rule):
    """Without error feedback (quantizing the group as it is) a grid gives round-to-nearest exactly."""
    torch.manual_seed(4)
    group = torch.randn(16, group_size) * 0.1
    grid = GroupGrid(group, quant_type, scale_rule)
    quantized = torch.stack([grid.quantize(group[:, j], j) for j in range(group_size)], 1)
    assert torch.equal(quantized, fake_quantize(group, quant_type, group_size, scale_rule))


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("quant_type,group_size", [("mxfp4", 32), ("int4", 32), ("nvfp4", 16)])
def test_gptq_errs_less_than_rounding_on_every_layer_of_a_model(arch, quant_type, group_size):
    from conftest import tiny_model

    teacher = tiny_model(arch, hidden_size=128, intermediate_size=256, vocab_size=256, num_hidden_layers=3)
    rtn, start = tiny_model(arch, hidden_size=128, intermediate_size=256, vocab_size=256, num_hidden_layers=3), \
        tiny_model(arch, hidden_size=128, intermediate_size=256, vocab_size=256, num_hidden_layers=3)
    for model in (rtn, start):
        quantize_model(model, quant_type, group_size)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 256, (8, 48), generator=g)
    mask = torch.ones_like(ids)
    mask[4:, 40:] = 0  # padding never enters a Hessian
    apply_gptq(start, [{"input_ids": ids[:4], "attention_mask": mask[:4]},
                       {"input_ids": ids[4:], "attention_mask": mask[4:]}])
    # each layer's error on the teacher's own inputs to that layer
    inputs = {}

    def keep_input(name):
        def hook(module, args):
            inputs[name] = args[0][mask.bool()]
        return hook

    hooks = [m.register_forward_pre_hook(keep_input(name))
             for name, m in teacher.named_modules() if isinstance(m, torch.nn.Linear) and name != "lm_head"]
    with torch.no_grad():
        teacher(input_ids=ids, attention_mask=mask)
    for h in hooks:
        h.remove()
    rtn_layers, gptq_layers = dict(rtn.named_modules()), dict(start.named_modules())
    for name, x in inputs.items():
        exact = x @ teacher.get_submodule(name).weight.T

        def error(layer):  # the layer's own quantized weight: nvfp4's with its fused group's tensor scale
            with torch.no_grad():
                return (x @ layer.quantized_weight().T - exact).square().sum()

        assert isinstance(gptq_layers[name], FakeQuantLinear)
        assert error(gptq_layers[name]) < error(rtn_layers[name]), name
        if quant_type != "int4":  # the latent is GPTQ's values, which the student computes with exactly
            with torch.no_grad():
                assert torch.equal(gptq_layers[name].quantized_weight(), gptq_layers[name].weight), name


# ---------------------------------------------------------------- train.py --init gptq

def assert_one_error_line(capsys, message):
    """The error is one line (after whatever transformers printed while loading the model)."""
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0]


def gptq_args(tiny_checkpoint, chat_dataset, output_dir, *extra):
    return tiny_args(tiny_checkpoint, chat_dataset, output_dir, "--quant-type", "mxfp4", "--init", "gptq", *extra)


@pytest.mark.parametrize("order", ["--gptq-actorder", "--no-gptq-actorder"])
def test_max_steps_zero_saves_the_gptq_start_as_a_student_that_beats_rounding(tmp_path, tiny_checkpoint,
                                                                              chat_dataset, order):
    from students import load_student
    from safetensors.torch import load_file

    out = tmp_path / "gptq"
    assert train.main(gptq_args(tiny_checkpoint, chat_dataset, out, "--max-steps", "0", "--eval-steps", "1",
                                order)) == 0
    rtn = tmp_path / "rtn"
    assert train.main(gptq_args(tiny_checkpoint, chat_dataset, rtn, "--max-steps", "0", "--eval-steps", "1",
                                 "--init", "rtn")) == 0
    kl = {run: json.loads((run / "metrics.jsonl").read_text().splitlines()[0])["heldout_kl"] for run in (out, rtn)}
    assert kl[out] < kl[rtn]
    checkpoint = out / "checkpoint-0"
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["step"] == 0
    student = load_student(checkpoint)[0]  # as eval.py and export.py rebuild it
    saved = load_file(checkpoint / "model.safetensors")
    teacher = load_file(tiny_checkpoint / "model.safetensors")
    layer = student.get_submodule("model.layers.0.mlp.down_proj")
    name = "model.layers.0.mlp.down_proj.weight"
    assert torch.equal(saved[name], layer.weight)
    assert torch.equal(fake_quantize(saved[name], "mxfp4", 32, "mse"), saved[name])  # on the grid already
    assert not torch.equal(saved[name], fake_quantize(teacher[name], "mxfp4", 32, "mse"))  # not rounding


def test_an_nvfp4_gptq_start_beats_rounding_and_is_saved_on_its_shared_scale_grids(tmp_path, tiny_checkpoint,
                                                                                     chat_dataset):
    from students import load_student

    def nvfp4_args(out, *extra):
        argv = gptq_args(tiny_checkpoint, chat_dataset, out, "--max-steps", "0", "--eval-steps", "1", *extra)
        at = argv.index("--group-size")
        return argv[:at] + argv[at + 2:] + ["--quant-type", "nvfp4"]

    out, rtn = tmp_path / "gptq", tmp_path / "rtn"
    assert train.main(nvfp4_args(out)) == 0
    assert train.main(nvfp4_args(rtn, "--init", "rtn")) == 0
    kl = {run: json.loads((run / "metrics.jsonl").read_text().splitlines()[0])["heldout_kl"] for run in (out, rtn)}
    assert kl[out] < kl[rtn]
    student = load_student(out / "checkpoint-0")[0]  # as eval.py and export.py rebuild it
    layers = [m for m in student.modules() if isinstance(m, FakeQuantLinear)]
    assert layers and any(m.fused_with for m in layers)
    with torch.no_grad():  # each latent weight is what the student computes with, its fused group's scale included
        assert all(torch.equal(m.quantized_weight(), m.weight) for m in layers)


def test_an_unrounded_gptq_start_is_the_same_student_with_latent_weights_off_the_grid(tmp_path, tiny_checkpoint,
                                                                                     chat_dataset):
    from safetensors.torch import load_file

    latent = {}
    for mode in ("values", "unrounded"):
        out = tmp_path / mode
        assert train.main(gptq_args(tiny_checkpoint, chat_dataset, out, "--max-steps", "0", "--init-samples", "8",
                                    "--gptq-latent", mode)) == 0
        latent[mode] = load_file(out / "checkpoint-0" / "model.safetensors")
    name = "model.layers.0.mlp.down_proj.weight"
    values, unrounded = latent["values"][name], latent["unrounded"][name]
    assert torch.equal(fake_quantize(unrounded, "mxfp4", 32, "mse"), values)
    assert (unrounded != values).float().mean() > 0.5


def test_a_gptq_start_trains_resumes_and_refuses_a_resume_that_started_otherwise(tmp_path, tiny_checkpoint,
                                                                                 chat_dataset, capsys, caplog):
    out = tmp_path / "run"
    assert train.main(gptq_args(tiny_checkpoint, chat_dataset, out, "--max-steps", "3", "--stop-after", "2",
                                "--init-samples", "8")) == 0
    caplog.clear()
    with caplog.at_level("INFO"):
        assert train.main(gptq_args(tiny_checkpoint, chat_dataset, out, "--max-steps", "3", "--resume",
                                    "--init-samples", "8")) == 0
    assert "--init gptq" not in caplog.text  # the resumed run's weights come from its checkpoint
    assert (out / "checkpoint-3").exists()
    assert train.main(gptq_args(tiny_checkpoint, chat_dataset, out, "--max-steps", "4", "--resume",
                                "--init", "rtn")) == 2
    assert "different configuration (init" in capsys.readouterr().err


@pytest.mark.parametrize("extra,message", [
    (["--quant-type", "none"], "--init gptq quantizes the student's start; it needs a --quant-type"),
    (["--init-samples", "0"], "--init-samples must be >= 1"),
    (["--init", "awq"], "argument --init: invalid choice"),
    (["--gptq-latent", "rounded"], "invalid choice: 'rounded' (choose from 'values', 'unrounded')"),
    (["--init", "rtn", "--gptq-latent", "unrounded"], "--gptq-latent and --no-gptq-actorder shape a GPTQ start"),
    (["--init", "rtn", "--no-gptq-actorder"], "--gptq-latent and --no-gptq-actorder shape a GPTQ start"),
    (["--init-samples", "1", "--max-length", "40"], "calibration tokens cannot measure a layer with 128 inputs"),
])
def test_gptq_bad_input_is_one_line_and_writes_nothing(tmp_path, tiny_checkpoint, chat_dataset, capsys, extra,
                                                       message):
    out = tmp_path / "run"
    assert train.main(gptq_args(tiny_checkpoint, chat_dataset, out, "--max-steps", "1", *extra)) == 2
    assert_one_error_line(capsys, message)
    assert not out.exists()


def test_a_gptq_run_saved_before_activation_order_existed_counts_as_natural_order():
    from checkpoints import config_differences

    saved = {**dataclasses.asdict(train.TrainConfig(init="gptq"))}
    del saved["gptq_actorder"]  # as run_config.json was written before the flag
    assert config_differences(saved, train.TrainConfig(init="gptq", gptq_actorder=False)) == []
    assert config_differences(saved, train.TrainConfig(init="gptq")) == ["gptq_actorder"]


def test_gptq_needs_completions_to_calibrate_on(tmp_path, tiny_checkpoint, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Say {i}."}]}) + "\n"
                               for i in range(8)))
    out = tmp_path / "run"
    assert train.main(gptq_args(tiny_checkpoint, prompts, out, "--max-steps", "1", "--lmbda", "1")) == 2
    assert_one_error_line(capsys, "--init gptq calibrates on prompts with their completions")
    assert not out.exists()


def test_a_lora_run_from_gptq_resumes_on_the_same_frozen_base(tmp_path, tiny_checkpoint, chat_dataset):
    from test_train import weights

    common = ("--max-steps", "3", "--lora-r", "4", "--init-samples", "8")
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert train.main(gptq_args(tiny_checkpoint, chat_dataset, straight, *common)) == 0
    assert train.main(gptq_args(tiny_checkpoint, chat_dataset, split, *common, "--stop-after", "1")) == 0
    assert train.main(gptq_args(tiny_checkpoint, chat_dataset, split, *common, "--resume")) == 0
    a, b = weights(straight / "checkpoint-3"), weights(split / "checkpoint-3")  # merged: base + adapters
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resuming_the_saved_start_with_max_steps_zero_leaves_it_untouched(tmp_path, tiny_checkpoint, chat_dataset):
    out = tmp_path / "run"
    assert train.main(gptq_args(tiny_checkpoint, chat_dataset, out, "--max-steps", "0", "--init-samples", "8")) == 0
    saved = (out / "checkpoint-0" / "model.safetensors").stat()
    assert train.main(gptq_args(tiny_checkpoint, chat_dataset, out, "--max-steps", "0", "--init-samples", "8",
                                "--resume")) == 0
    again = (out / "checkpoint-0" / "model.safetensors").stat()
    assert (again.st_ino, again.st_mtime_ns) == (saved.st_ino, saved.st_mtime_ns)


def test_learned_scales_start_from_the_gptq_weights_not_the_teachers(tmp_path, tiny_checkpoint, chat_dataset):
    """--init gptq --learn-scales: the scales are measured on GPTQ's weights, so step 0 is
    GPTQ's student exactly, with the same held-out KL."""
    from students import load_student

    kl, logits = {}, {}
    ids = torch.randint(0, 100, (1, 12))
    for name, extra in (("gptq", ()), ("learned", ("--learn-scales",))):
        out = tmp_path / name
        assert train.main(gptq_args(tiny_checkpoint, chat_dataset, out, "--quant-type", "int4_sym", "--max-steps",
                                    "0", "--eval-steps", "1", "--init-samples", "8", *extra)) == 0
        kl[name] = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["heldout_kl"]
        student, _, settings = load_student(out / "checkpoint-0")
        assert settings.get("learn_scales", False) == (name == "learned")
        with torch.no_grad():
            logits[name] = student(ids).logits
    assert kl["gptq"] == kl["learned"]
    assert torch.equal(logits["gptq"], logits["learned"])
