"""Small data builders and Kedro plumbing shared by the tests."""

from __future__ import annotations

from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import yaml
from kedro.framework.hooks.manager import _create_hook_manager
from kedro.io import DataCatalog, MemoryDataset
from kedro.pipeline import Pipeline
from kedro.runner import SequentialRunner

from c2s_kedro.harness import PROJECT_ROOT, copy_project  # noqa: F401 - the tests import them from here
from c2s_kedro.hooks import ParameterNamespaceHook

MITO_GENES = ["MT-CO1", "MT-ND1", "MT-ATP6"]
T_MARKERS = [f"TMARK{i}" for i in range(1, 9)]
B_MARKERS = [f"BMARK{i}" for i in range(1, 9)]


def make_counts_adata(n_cells: int = 60, n_genes: int = 40, seed: int = 0) -> ad.AnnData:
    """Raw integer counts (CSR float32): two cell types with their own marker genes, 3 MT- genes.

    The first half of the cells are "T cell" (TMARK* high), the second half "B cell" (BMARK* high).
    """
    rng = np.random.default_rng(seed)
    n_other = n_genes - len(MITO_GENES) - len(T_MARKERS) - len(B_MARKERS)
    assert n_other > 0
    genes = MITO_GENES + T_MARKERS + B_MARKERS + [f"GENE{i:02d}" for i in range(n_other)]
    is_t = np.arange(n_cells) < n_cells // 2
    rates = np.full((n_cells, n_genes), 2.0)
    rates[:, : len(MITO_GENES)] = 1.0
    t_cols = slice(len(MITO_GENES), len(MITO_GENES) + len(T_MARKERS))
    b_cols = slice(t_cols.stop, t_cols.stop + len(B_MARKERS))
    rates[:, t_cols] = np.where(is_t[:, None], 12.0, 0.2)
    rates[:, b_cols] = np.where(is_t[:, None], 0.2, 12.0)
    counts = rng.poisson(rates).astype(np.float32)
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical(np.where(is_t, "T cell", "B cell")),
            "tissue": pd.Categorical(["blood"] * n_cells),
            "organism": pd.Categorical(["Homo sapiens"] * n_cells),
        },
        index=[f"cell_{i}" for i in range(n_cells)],
    )
    return ad.AnnData(X=sp.csr_matrix(counts), obs=obs, var=pd.DataFrame(index=genes))


# Gene names of tiny hub-like vocabularies: dashes, dots and names that are prefixes of others.
TRICKY_GENES = ["CD3D", "CD8A", "MT-CO1", "RP11-34P13.3", "HLA-DRB1", "IGKV1-5", "CD3", "LINC00115", "AC009.1"] + [
    f"GENE{i}" for i in range(200)
]


def byte_level_bpe_tokenizer(corpus: list[str], vocab_size: int = 300):
    """A hub-style tokenizer trained on ``corpus``: byte-level BPE as Pythia's, so a gene costs several
    tokens and token counts do not add up gene by gene; an end-of-text token and no pad token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")


def tiny_cell_sentences(genes: list[str], n_cells: int = 12, seed: int = 0):
    """``n_cells`` cell sentences of 20, 45, 70, ... random genes, two cell types, one tissue."""
    from datasets import Dataset

    rng = np.random.default_rng(seed)
    return Dataset.from_dict({
        "cell_name": [f"c{i}" for i in range(n_cells)],
        "cell_sentence": [" ".join(rng.permutation(genes)[: 20 + 25 * i]) for i in range(n_cells)],
        "cell_type": ["T cell", "B cell"] * (n_cells // 2),
        "tissue": ["blood"] * n_cells,
        "organism": ["Homo sapiens"] * n_cells,
    })


def load_parameters(name: str) -> dict[str, Any]:
    """The project's parameters from conf/base/parameters_<name>.yml, with ``${...}`` references to
    other parameter files resolved as Kedro's OmegaConfigLoader resolves them."""
    from omegaconf import OmegaConf

    base = PROJECT_ROOT / "conf" / "base"
    with open(base / f"parameters_{name}.yml") as stream:
        own = yaml.safe_load(stream)
    merged = OmegaConf.merge(*(OmegaConf.load(path) for path in sorted(base.glob("parameters_*.yml"))))
    resolved = OmegaConf.to_container(merged, resolve=True)
    return {key: resolved[key] for key in own}


def params_entries(parameters: dict[str, Any]) -> dict[str, Any]:
    """``params:`` names for every (nested) key, as Kedro's context builds them:
    ``params:a`` and ``params:a.b`` both exist for ``{"a": {"b": 1}}``."""
    entries: dict[str, Any] = {}

    def add(name: str, value: Any) -> None:
        entries[f"params:{name}"] = value
        if isinstance(value, dict):
            for key, inner in value.items():
                add(f"{name}.{key}", inner)

    for key, value in parameters.items():
        add(key, value)
    return entries


class KeptMemoryDataset(MemoryDataset):
    """A ``MemoryDataset`` that keeps its data when the runner releases it after its last use,
    so that intermediate outputs can be inspected after the run."""

    def _release(self) -> None:
        pass


def run_pipeline(pipeline: Pipeline, inputs: dict[str, Any]) -> DataCatalog:
    """Run ``pipeline`` with ``SequentialRunner`` on a catalog of ``MemoryDataset``s holding
    ``inputs`` plus one empty (kept) ``MemoryDataset`` per output; return the catalog."""
    datasets: dict[str, MemoryDataset] = {
        name: MemoryDataset(data=value, copy_mode="assign") for name, value in inputs.items()
    }
    for name in pipeline.all_outputs():
        datasets[name] = KeptMemoryDataset(copy_mode="assign")
    missing = pipeline.inputs() - set(datasets)
    assert not missing, f"test catalog lacks pipeline inputs {missing}"
    catalog = DataCatalog(datasets=datasets)
    hooks = _create_hook_manager()
    hooks.register(ParameterNamespaceHook())  # as in a kedro run: namespaced settings are named in errors
    SequentialRunner().run(pipeline, catalog, hooks)
    return catalog
