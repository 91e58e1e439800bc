"""The checkpoint reader (model/weights.py): equal to the safetensors library on what it reads, lazy nodes equal
to the tensor operations they stand for, and a malformed file an error naming it."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from model.errors import CheckpointError
from model.weights import Chunk, InMemory, Stack, read_header


@pytest.fixture
def file(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "a": torch.randn(6, 4, 5, generator=g).to(torch.bfloat16),
        "b": torch.randn(7, generator=g),
        "c": torch.randint(-100, 100, (3, 2), generator=g).to(torch.int8),
        "d": torch.randn(2, 3, generator=g).to(torch.float16),
    }
    path = tmp_path / "x.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path


def test_reads_what_safetensors_reads(file):
    want = load_file(file)
    nodes = read_header(file)
    assert set(nodes) == set(want)
    for name, t in want.items():
        got = nodes[name].load()
        assert got.dtype == t.dtype and torch.equal(got, t), name
        into = torch.empty(t.shape, dtype=torch.float64)  # a cast on the way
        nodes[name].load_into(into)
        assert torch.equal(into, t.double()), name


def test_nodes_equal_the_tensor_operations(file):
    a = load_file(file)["a"]
    node = read_header(file)["a"]
    assert torch.equal(node[4].load(), a[4])  # one expert's rows: a byte range of the file
    for dim in (0, 1, 2, -1):
        n = next(k for k in (2, 5) if a.shape[dim] % k == 0)
        for i, part in enumerate(node.chunk(n, dim)):
            assert isinstance(part, Chunk) and torch.equal(part.load(), a.chunk(n, dim)[i])
            if a.shape[0] > 1:
                assert torch.equal(part[1].load(), a.chunk(n, dim)[i][1])
    stacked = Stack([node[i] for i in range(6)])
    assert torch.equal(stacked.load(), a) and torch.equal(stacked[2].load(), a[2])
    assert torch.equal(InMemory(a)[3].load(), a[3])


def test_malformed_files_are_named(tmp_path, file):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(struct.pack("<Q", 10_000) + b"{}")
    with pytest.raises(CheckpointError, match=r"bad.safetensors: not a readable safetensors file \(a header of 10000"):
        read_header(bad)
    header = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}  # 4 floats need 16 bytes
    raw = json.dumps(header).encode()
    bad.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(8))
    with pytest.raises(CheckpointError, match="offsets 0..8 do not hold its 16 bytes"):
        read_header(bad)
    node = read_header(file)["a"]
    file.write_bytes(file.read_bytes()[: node.start + 10])  # truncated inside the tensor
    with pytest.raises(CheckpointError, match="the file ends inside a tensor"):
        node.load()
