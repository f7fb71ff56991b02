"""`common.batched_rows`: DataManager's loaders fetch tensor rows a batch at a time and yield the same batches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset
from torch.utils.data._utils.collate import default_collate

from fedsilo.common.batched_rows import Rows, TensorRows, collate_rows, rows_view
from fedsilo.common.datasets import CsvDataset
from fedsilo.common.training_plan import DataManager


def _same(batches: list, expected: list) -> None:
    assert len(batches) == len(expected)
    for got, want in zip(batches, expected, strict=True):
        assert type(got) is type(want) and len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            assert g.dtype == w.dtype and g.shape == w.shape and torch.equal(g, w)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 70), batch=st.integers(1, 16), shuffle=st.booleans(), drop_last=st.booleans(),
       fields=st.integers(1, 3), seed=st.integers(0, 2**16))  # fmt: skip
def test_a_tensor_dataset_yields_the_batches_torch_s_own_loader_yields(
    n: int, batch: int, shuffle: bool, drop_last: bool, fields: int, seed: int
) -> None:
    gen = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(n, 3, generator=gen), torch.randint(0, 5, (n,), generator=gen),
               torch.rand(n, 2, 2, generator=gen).double()][:fields]  # fmt: skip
    dm = DataManager(TensorDataset(*tensors), batch_size=batch, shuffle=shuffle, drop_last=drop_last)
    torch.manual_seed(seed)
    got = list(dm.loader())
    torch.manual_seed(seed)
    want = list(DataLoader(TensorDataset(*tensors), batch_size=batch, shuffle=shuffle, drop_last=drop_last))
    _same(got, want)


def test_the_train_and_test_split_of_a_tensor_dataset_are_batched_subsets_with_torch_s_batches() -> None:
    x, y = torch.randn(50, 4), torch.arange(50)
    dm = DataManager(TensorDataset(x, y), batch_size=8)
    train, test = dm.split(0.2, seed=5)
    for part in (train, test):  # still Subsets (their indices), of a TensorRows over the same tensors
        assert type(part.dataset) is Subset and isinstance(part.dataset.dataset, TensorRows)
        assert part.dataset.dataset.tensors[0] is x
    perm = torch.randperm(50, generator=torch.Generator().manual_seed(5)).tolist()
    _same(list(train), list(DataLoader(Subset(TensorDataset(x, y), perm[10:]), batch_size=8)))
    _same(list(test), list(DataLoader(Subset(TensorDataset(x, y), perm[:10]), batch_size=8)))


def test_a_csv_dataset_is_batched_and_a_subclass_that_changes_a_sample_is_not(tmp_path: Path) -> None:
    csv = tmp_path / "t.csv"
    csv.write_text("a,b,label\n" + "".join(f"{i},{i * 2},{i % 3}\n" for i in range(20)), encoding="utf-8")

    class Doubled(CsvDataset):
        def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
            x, y = super().__getitem__(i)
            return 2 * x, y

    plain, doubled = CsvDataset(csv, target="label"), Doubled(csv, target="label")
    assert isinstance(rows_view(plain), TensorRows)
    assert rows_view(doubled) is doubled  # only it knows what a sample is
    _same(list(DataManager(plain, batch_size=6).loader()), list(DataLoader(plain, batch_size=6)))
    got = list(DataManager(doubled, batch_size=6).loader())
    assert torch.equal(got[0][0], 2 * plain.x[:6])


def test_other_datasets_and_the_plan_s_own_collate_fn_are_left_as_they_are() -> None:
    class Squares(Dataset):
        def __len__(self) -> int:
            return 10

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"x": torch.tensor([float(i)]), "y": torch.tensor(i * i)}

    _same_dicts = list(DataManager(Squares(), batch_size=4).loader())
    assert torch.equal(_same_dicts[0]["y"], torch.tensor([0, 1, 4, 9]))
    seen: list[int] = []

    def mine(samples: list) -> int:
        seen.append(len(samples))
        return len(samples)

    loader = DataManager(TensorDataset(torch.zeros(10, 2)), batch_size=4, collate_fn=mine).loader()
    assert isinstance(loader.dataset, TensorDataset) and list(loader) == [4, 4, 2] and seen == [4, 4, 2]
    unbatched = DataManager(TensorDataset(torch.arange(3.0)), batch_size=None).loader()
    assert [t.item() for (t,) in unbatched] == [0.0, 1.0, 2.0]  # no batching: torch's default_convert, per sample


def test_a_poisson_batch_may_be_empty_and_rows_answer_its_length() -> None:
    rows = TensorRows(torch.randn(6, 2), torch.arange(6))
    empty = rows.__getitems__([])
    assert isinstance(empty, Rows) and len(empty) == 0 and [t.shape[0] for t in collate_rows(empty)] == [0, 0]
    assert len(rows.__getitems__(np.array([5, 0, 5]))) == 3  # with replacement, any index sequence


def test_a_batch_handed_to_another_collate_function_is_the_sequence_of_samples_torch_would_pass() -> None:
    x, y = torch.randn(5, 3), torch.arange(5)
    batch = TensorRows(x, y).__getitems__([4, 1, 2])
    assert len(batch) == 3 and torch.equal(batch[1][0], x[1]) and batch[2][1] == 2 and len(batch[:2]) == 2
    _same([default_collate(batch)], [default_collate([(x[i], y[i]) for i in (4, 1, 2)])])


def test_under_opacus_poisson_sampling_the_batched_loader_trains() -> None:
    import opacus

    x, y = torch.randn(64, 4), torch.randint(0, 2, (64,))
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = DataManager(TensorDataset(x, y), batch_size=8).loader()
    engine = opacus.PrivacyEngine()
    model, optimizer, private = engine.make_private(module=model, optimizer=optimizer, data_loader=loader,
                                                    noise_multiplier=1.0, max_grad_norm=1.0)  # fmt: skip
    assert isinstance(private.dataset, TensorRows)  # Opacus keeps the batched dataset and wraps collate_rows
    sizes = []
    for data, target in private:
        sizes.append(len(target))
        optimizer.zero_grad()
        if len(target):
            torch.nn.functional.cross_entropy(model(data), target).backward()
        optimizer.step()
    assert len(sizes) == 8 and sum(sizes) > 0 and engine.get_epsilon(1e-5) > 0
