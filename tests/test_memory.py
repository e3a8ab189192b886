"""vitlab.memory: freed CPU blocks handed out again inside a scope, PyTorch's allocator back after it, the same
numbers either way, and fit and the budget probe training inside it."""

import contextlib
import ctypes
import ctypes.util
import os
import sys
import threading

import pytest
import torch
import torch.nn.functional as F
from tiny_digits import tiny_digits, tiny_vit

from vitlab import build, memory
from vitlab.budget import probe_batches, time_steps
from vitlab.training import fit

pytestmark = pytest.mark.skipif(build.compiler() is None or sys.platform == "win32",
                                reason="no C++ toolchain to build the allocator with")

MB = 1 << 20


@pytest.fixture(autouse=True)
def nothing_kept_before_or_after():
    memory.clear()
    yield
    memory.set_limit(memory.LIMIT_BYTES)
    memory.clear()
    assert not memory.active()


def page_faults() -> int:
    """This thread's minor page faults so far (the process's where Linux's per-thread count is missing): other
    threads, such as a compiler's workers left from an earlier test, fault pages of their own meanwhile."""
    import resource  # Unix only: imported here, so that elsewhere the module is skipped, not an import error

    return resource.getrusage(getattr(resource, "RUSAGE_THREAD", resource.RUSAGE_SELF)).ru_minflt


def test_the_allocator_builds_here():
    assert memory.available(), memory.error


def test_a_freed_block_is_handed_out_again_inside_the_scope_and_freed_after():
    with memory.reusing() as on:
        assert on and memory.active()
        first = torch.empty(MB // 4)  # 1 MiB
        address = first.data_ptr()
        del first
        assert memory.kept_bytes() == MB
        again = torch.empty(MB // 4)
        assert again.data_ptr() == address and memory.kept_bytes() == 0
        other = torch.empty(MB // 2)  # another size: not that block
        assert other.data_ptr() != address
    assert not memory.active()
    assert memory.kept_bytes() == 0


def test_a_reused_40_MB_buffer_is_not_faulted_in_again():
    size = 10 * MB  # 40 MB of float32: above the largest block glibc keeps for reuse (32 MiB) when it can map afresh

    def five_steps() -> int:
        before = page_faults()
        for _ in range(5):
            torch.empty(size).fill_(1.0)
        return page_faults() - before

    pages = size * 4 // 4096
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # every page is touched by this thread, whose faults page_faults counts
    try:
        # The control, that page_faults sees fresh memory being faulted in: five blocks alive at once, after
        # malloc_trim has handed glibc's free pages back (whether PyTorch's own allocator faults a freed
        # block in again depends on the heap's history, so it is not the control).
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        if not hasattr(libc, "malloc_trim"):
            pytest.skip("the control needs glibc's malloc_trim")
        libc.malloc_trim(0)
        before = page_faults()
        alive = [torch.empty(size).fill_(1.0) for _ in range(5)]
        assert page_faults() - before > 4 * pages
        del alive
        with memory.reusing():
            torch.empty(size).fill_(1.0)  # the first block is new
            assert five_steps() < pages // 10
    finally:
        torch.set_num_threads(threads)


def test_tensors_made_inside_stay_valid_after_and_their_blocks_are_not_kept():
    with memory.reusing():
        x = torch.arange(MB, dtype=torch.float32)
    assert x.sum().item() == (MB - 1) * MB / 2
    del x
    assert memory.kept_bytes() == 0


def test_small_and_empty_tensors_go_straight_to_the_c_library():
    with memory.reusing():
        tiny, empty = torch.ones(100), torch.empty(0)
        del tiny, empty
        assert memory.kept_bytes() == 0


def test_keep_leaves_the_blocks_for_the_next_scope_and_clear_frees_them():
    with memory.reusing(keep=True):
        address = torch.empty(MB).data_ptr()
    assert not memory.active() and memory.kept_bytes() == 4 * MB
    with memory.reusing(keep=True):
        assert torch.empty(MB).data_ptr() == address
    assert memory.clear() == 4 * MB
    assert memory.kept_bytes() == 0


def test_nested_scopes_share_the_allocator_until_the_outermost_leaves():
    with memory.reusing():
        with memory.reusing() as inner:
            assert inner
        assert memory.active()
        torch.empty(MB)
        assert memory.kept_bytes() == 4 * MB  # the inner exit cleared nothing
    assert not memory.active() and memory.kept_bytes() == 0


def test_an_error_inside_gives_pytorch_its_allocator_back():
    with pytest.raises(RuntimeError, match="inside"):
        with memory.reusing():
            torch.empty(MB)
            raise RuntimeError("inside")
    assert not memory.active() and memory.kept_bytes() == 0


def test_the_limit_caps_the_bytes_kept():
    memory.set_limit(6 * MB)
    with memory.reusing():
        blocks = [torch.empty(MB) for _ in range(3)]  # 4 MiB each
        del blocks
        assert memory.kept_bytes() == 4 * MB  # the second block would pass the limit
    with pytest.raises(ValueError, match=r"limit_bytes to be an int >= 0; got -1"):
        memory.set_limit(-1)


def test_blocks_allocated_and_freed_on_many_threads_keep_their_values():
    errors = []

    def work(seed: int) -> None:
        try:
            for step in range(50):
                x = torch.full(((seed + 1) * 4096,), float(step))
                if x.sum().item() != step * x.numel():
                    errors.append((seed, step))
        except Exception as error:  # a thread's exception would otherwise only be printed
            errors.append(error)

    with memory.reusing():
        threads = [threading.Thread(target=work, args=(seed,)) for seed in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert errors == []


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_dataloader_workers_forked_inside_the_scope_allocate_and_return():
    data = torch.utils.data.TensorDataset(torch.arange(64, dtype=torch.float32).repeat_interleave(2048).view(64, 2048))
    with memory.reusing():
        loader = torch.utils.data.DataLoader(data, batch_size=8, num_workers=2,
                                             multiprocessing_context="fork")
        sums = [batch.sum().item() for (batch,) in loader]
    assert sums == [2048 * sum(range(i, i + 8)) for i in range(0, 64, 8)]


def test_training_steps_give_the_same_numbers_inside_and_outside():
    def train(scope) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = tiny_vit()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        images, labels = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
        with scope:
            for _ in range(3):
                optimizer.zero_grad()
                F.cross_entropy(model(images), labels).backward()
                optimizer.step()
        return [p.detach().clone() for p in model.parameters()]

    for inside, outside in zip(train(memory.reusing()), train(contextlib.nullcontext()), strict=True):
        assert torch.equal(inside, outside)


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("VITLAB_REUSE_MEMORY", "0")
    assert not memory.available()
    with memory.reusing() as on:
        assert not on and not memory.active()


def test_without_a_compiler_it_changes_nothing_and_says_why(monkeypatch):
    monkeypatch.setattr(memory, "_library_state", {})
    monkeypatch.setattr(memory, "error", None)
    monkeypatch.setattr(build.shutil, "which", lambda name: None)
    with memory.reusing() as on:
        assert not on
    assert "no C++ compiler" in memory.error
    assert not memory.available()


def test_fit_and_the_budget_probe_train_inside_the_scope_and_keep_nothing_after():
    seen = []
    fit(tiny_vit(), tiny_digits(64), epochs=2, batch_size=32, progress=False,
        callback=lambda history: seen.append(memory.active()))
    assert seen == [True, True]
    assert not memory.active() and memory.kept_bytes() == 0

    model = tiny_vit()
    steps = []
    real = model.forward
    model.forward = lambda x: steps.append(memory.active()) or real(x)
    time_steps(model, model, probe_batches(tiny_digits(32), 16, augment=False, elastic=0.0, seed=0))
    assert steps and all(steps)  # the training steps and the validation forward
    assert not memory.active()
