"""The shuffle buffer: exact batch sizes, every row served once per pass (none twice, none dropped), batches
mixed across many sequences, and a resume position after which no served row comes back."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest
import torch

from crosscoder.data.activations import ActivationBlock
from crosscoder.data.shuffle import ShuffleBuffer
from crosscoder.errors import ConfigError

SEQUENCE_TOKENS = 63  # one toy sequence of 64 tokens without its BOS


def sequence_blocks(n_blocks: int, sequences_per_block: int = 1, start: int = 0) -> list[ActivationBlock]:
    """Blocks whose rows carry a unique id (sequence * 1000 + position), also written into the activations,
    so a row's id and its activations can be checked to travel together."""
    blocks = []
    for index in range(start, start + n_blocks):
        ids = torch.tensor([
            (index * sequences_per_block + seq) * 1000 + pos
            for seq in range(sequences_per_block) for pos in range(SEQUENCE_TOKENS)
        ])
        activations = ids.double().view(-1, 1, 1).expand(-1, 2, 3).clone()
        blocks.append(ActivationBlock(index, activations, ids))
    return blocks


def check_rows_travel_with_ids(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    activations, ids = batch
    assert torch.equal(activations[:, 0, 0].long(), ids) and torch.equal(activations[:, 1, 2].long(), ids)


def test_every_row_once_and_every_batch_exact() -> None:
    """A finite stream through the buffer: all batches exactly batch_size, no id twice, none dropped but a
    remainder smaller than one batch."""
    blocks = sequence_blocks(40)  # 2520 rows
    buffer = ShuffleBuffer(capacity=1000, batch_size=64, refill_fraction=0.5, seed=1)
    batches = list(buffer.batches(blocks))
    assert all(b[0].shape == (64, 2, 3) and b[1].shape == (64,) for b in batches)
    for batch in batches:
        check_rows_travel_with_ids(batch)
    served = torch.cat([ids for _, ids in batches]).tolist()
    everything = torch.cat([b.token_ids for b in blocks]).tolist()
    assert len(served) == len(set(served)), "a row was served twice"
    assert set(served) <= set(everything)
    assert len(everything) - len(served) < 64, "more than the final partial batch was dropped"
    assert buffer.rows_served == len(served)


def test_batches_mix_many_sequences() -> None:
    """Each shuffled batch spans many sequences; unshuffled it spans one or two."""
    blocks = sequence_blocks(200)
    shuffled = list(itertools.islice(ShuffleBuffer(4096, 256, 0.5, seed=0).batches(blocks), 20))
    in_order = list(itertools.islice(ShuffleBuffer(0, 256).batches(blocks), 20))

    def sequences(batch: tuple[torch.Tensor, torch.Tensor]) -> int:
        return len(set((batch[1] // 1000).tolist()))

    assert min(sequences(b) for b in shuffled) >= 40  # ~65 sequences in the buffer, 256 draws
    assert max(sequences(b) for b in in_order) <= 6


def test_a_refill_mixes_old_and_new_rows() -> None:
    """After a refill, batches draw from rows that arrived before and after it: the buffer is not a queue."""
    blocks = sequence_blocks(60)
    buffer = ShuffleBuffer(630, 63, 0.5, seed=3)  # 10 sequences held, 5 served per round
    batches = list(itertools.islice(buffer.batches(blocks), 12))
    later = torch.cat([ids for _, ids in batches[5:10]]) // 1000  # the second round
    assert later.min() < 10 <= later.max()


def test_resume_position_skips_every_row_already_served() -> None:
    """A stream restarted at `next_block` never serves a row the first one served."""
    blocks = sequence_blocks(100)
    buffer = ShuffleBuffer(1024, 128, 0.5, seed=0)
    first = list(itertools.islice(buffer.batches(blocks), 15))
    served = set(torch.cat([ids for _, ids in first]).tolist())
    served_blocks = {row // 1000 for row in served}
    assert max(served_blocks) < buffer.next_block  # every served row came from before the position

    resumed = ShuffleBuffer(1024, 128, 0.5, seed=1)
    resumed.next_block = buffer.next_block
    later = torch.cat([ids for _, ids in resumed.batches(blocks[buffer.next_block :])]).tolist()
    assert served.isdisjoint(later)
    assert min(row // 1000 for row in later) >= buffer.next_block


def test_in_order_recut() -> None:
    """Without shuffling, uneven blocks become exact batches in order, the remainder dropped."""
    lengths = [3, 0, 7, 1, 12, 5, 2]  # 30 rows
    data = torch.arange(sum(lengths))
    blocks = [ActivationBlock(i, part.view(-1, 1, 1).float(), part) for i, part in enumerate(data.split(lengths))]
    batches = list(ShuffleBuffer(0, 4).batches(blocks))
    assert [b[0].shape for b in batches] == [torch.Size([4, 1, 1])] * 7
    assert torch.equal(torch.cat([ids for _, ids in batches]), torch.arange(28))


@pytest.mark.parametrize(("lengths", "batch_size", "n_batches"),
                         [([5], 5, 1), ([2, 2], 5, 0), ([11], 3, 3), ([1] * 9, 3, 3)])
def test_in_order_edge_cases(lengths: list[int], batch_size: int, n_batches: int) -> None:
    """Exact fits emit everything; too few rows emit nothing; one big block is split."""
    data = torch.arange(sum(lengths))
    blocks = [ActivationBlock(i, part.view(-1, 1, 1).float(), part) for i, part in enumerate(data.split(lengths))]
    batches = list(ShuffleBuffer(0, batch_size).batches(blocks))
    assert len(batches) == n_batches
    if batches:
        assert torch.equal(torch.cat([ids for _, ids in batches]), data[: n_batches * batch_size])


def test_a_buffer_smaller_than_a_batch_is_refused() -> None:
    with pytest.raises(ConfigError, match="buffer_tokens=100"):
        ShuffleBuffer(100, 64, refill_fraction=0.5)


@pytest.mark.parametrize(("capacity", "stop_after"), [(1000, 5), (1000, 33), (0, 7), (4096, 3)])
def test_state_dict_resumes_exactly(capacity: int, stop_after: int) -> None:
    """Serve some batches, save the state, rebuild from the saved block onward: the rest is exactly what an
    uninterrupted buffer serves (also across the drain at the end of a finite stream: 40 blocks < 4096 rows)."""
    blocks = sequence_blocks(40)
    reference = list(ShuffleBuffer(capacity, 64, 0.5, seed=3).batches(blocks))

    first = ShuffleBuffer(capacity, 64, 0.5, seed=3)
    served = list(itertools.islice(first.batches(blocks), stop_after))
    scalars, tensors = first.state_dict()
    resumed = ShuffleBuffer(capacity, 64, 0.5, seed=99)  # the generator state comes from the checkpoint
    resumed.load_state_dict(scalars, {name: tensor.clone() for name, tensor in tensors.items()})
    served += list(resumed.batches(blocks[scalars["next_block"]:]))

    assert len(served) == len(reference)
    for got, want in zip(served, reference, strict=True):
        assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])
    assert resumed.rows_served == sum(ids.shape[0] for _, ids in reference)


def test_state_dict_refuses_other_settings() -> None:
    buffer = ShuffleBuffer(1000, 64, 0.5, seed=0)
    list(itertools.islice(buffer.batches(sequence_blocks(40)), 2))
    scalars, tensors = buffer.state_dict()
    with pytest.raises(ConfigError, match="batch_size=64"):
        ShuffleBuffer(1000, 32, 0.5).load_state_dict(scalars, tensors)


@pytest.mark.parametrize(("capacity", "fail_at_block"), [(1000, 25), (0, 9), (4096, 70)])
def test_a_failing_stream_leaves_the_buffer_between_two_batches(capacity: int, fail_at_block: int) -> None:
    """A block source that raises (a dead worker, a corrupt shard) mid-stream: the state saved right after the
    error resumes to exactly the batches an uninterrupted buffer serves, none lost and none twice."""
    blocks = sequence_blocks(100)
    reference = list(ShuffleBuffer(capacity, 64, 0.5, seed=3).batches(blocks))

    def failing() -> Iterator[ActivationBlock]:
        yield from blocks[:fail_at_block]
        raise RuntimeError("worker died")

    first = ShuffleBuffer(capacity, 64, 0.5, seed=3)
    served = []
    with pytest.raises(RuntimeError, match="worker died"):
        for batch in first.batches(failing()):
            served.append(batch)
    scalars, tensors = first.state_dict()
    resumed = ShuffleBuffer(capacity, 64, 0.5, seed=99)
    resumed.load_state_dict(scalars, {name: tensor.clone() for name, tensor in tensors.items()})
    served += list(resumed.batches(blocks[scalars["next_block"]:]))

    assert len(served) == len(reference)
    for got, want in zip(served, reference, strict=True):
        assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])
