"""What each rank runs in tests/test_progress.py: a short run with the bar forced on and a
report every 2 steps, with stdout and stderr captured."""

from __future__ import annotations

import contextlib
import io
import os

import zero_ext
from zero_ext import comm

from engine_cases import build_model, config, global_batch


def captured_run() -> dict:
    os.environ["ZERO_EXT_PROGRESS"] = "1"
    cfg = config(2, "fp32", 1, comm.world_size())
    cfg.update(steps_per_print=2, wall_clock_breakdown=True)
    cfg["scheduler"] = {"type": "WarmupDecayLR", "params": {"total_num_steps": 4,
                                                            "warmup_num_steps": 1}}
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        engine = zero_ext.initialize(model=build_model(), config=cfg)[0]
        rank = comm.rank()
        for step in range(4):
            tokens, targets = global_batch(step, comm.world_size(), 1)
            engine.backward(engine(tokens[0, rank], targets[0, rank]))
            engine.step()
        printed = (len(out.getvalue()), len(err.getvalue()))
        # A trainer takes over the output: two more steps (step 6 would print a report line),
        # then its logger's figures.
        engine.log_externally()
        engine.training_metrics()  # the window starts here
        for step in range(4, 6):
            tokens, targets = global_batch(step, comm.world_size(), 1)
            engine.backward(engine(tokens[0, rank], targets[0, rank]))
            engine.step()
        metrics = engine.training_metrics()
    return {"stdout": out.getvalue(), "stderr": err.getvalue(), "printed": printed,
            "trainable": engine.monitor.trainable_params,
            "model_params": engine.monitor.model_params, "metrics": metrics,
            "grad_norm": engine.get_global_grad_norm(), "skipped": engine.skipped_steps}


def recompute_flags() -> dict:
    """The FLOP estimate's recompute flag after one training forward of a tiny transformers
    Llama, with and without its gradient checkpointing (which recomputes each layer)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out = {}
    for enabled in (False, True):
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=37, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16))
        if enabled:
            model.gradient_checkpointing_enable()
        engine = zero_ext.initialize(model=model, config=config(2, "fp32", 1,
                                                                comm.world_size()))[0]
        tokens = global_batch(0, comm.world_size(), 1)[0][0, comm.rank()]
        engine.backward(engine(input_ids=tokens, labels=tokens).loss)
        engine.step()
        out[enabled] = engine.monitor.recompute
    return out
