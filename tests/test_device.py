"""What a run measures and compiles, shown on the CPU: every run of a sweep in one process is
compiled (dynamo's recompile limit would make the 9th on eager), and peak_mem_mb counts the
training steps alone (a simulated CUDA allocator)."""
import pytest
import torch

from bknbench.config import RunConfig
from bknbench.data.registry import load_dataset
from bknbench.device import TrainingMemory
from bknbench.train import train_run


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic")


def test_every_run_of_a_sweep_in_one_process_is_compiled(monkeypatch, data):
    """Ten micro-batch sizes in one process, more than dynamo's recompile_limit (8): each
    run hands its graph to the backend (the eager one: quick), none falls back to eager."""
    compiles = []

    def backend(gm, example_inputs):
        compiles.append(gm)
        return gm.forward

    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real(model, backend=backend))
    for b in (16, 20, 24, 28, 32, 40, 48, 56, 64, 128):
        before = len(compiles)
        out = train_run(RunConfig(spec="bn", dataset="synthetic", model="mlp", norm_batch=b,
                                  sgd_batch=b, epochs=1, evals_per_epoch=1, compile=True), data)
        assert out.status == "ok" and len(compiles) > before, b


def test_training_memory_counts_the_steps_not_the_data_or_evaluation(monkeypatch):
    memory = {"now": 0, "peak": 0}  # a simulated allocator, bytes

    def use(n):
        memory["now"] += n
        memory["peak"] = max(memory["peak"], memory["now"])

    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: memory["now"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: memory["peak"])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats",
                        lambda device=None: memory.update(peak=memory["now"]))
    meter = TrainingMemory(torch.device("cuda"))
    use(100 * 2**20)  # model and optimizer
    before = meter.allocated()
    use(1000 * 2**20)  # the dataset
    meter.base = meter.allocated() - before
    for activations in (50, 70):  # two stretches of steps, an evaluation between them
        meter.start()
        use(activations * 2**20)
        use(-activations * 2**20)
        meter.stop()
        use(500 * 2**20)  # the evaluation's forwards
        use(-500 * 2**20)
    assert meter.mb() == 170.0
    assert TrainingMemory(torch.device("cpu")).mb() is None
