"""Project hooks: the parameter namespace of the running node, and torchrun's non-zero ranks."""

from kedro.io import MemoryDataset
from kedro.pipeline import node, pipeline

from c2s_kedro.hooks import ParameterNamespaceHook, _KeptInMemory
from c2s_kedro.parameters import PARAMETER_NAMESPACE, qualified


def _identity(x, params):
    return x


def test_namespaced_parameters_make_messages_name_the_namespaced_setting():
    base = pipeline([node(_identity, ["raw_adata", "params:data_processing.qc"], "qc_adata", name="filter")])
    screen = pipeline(base, namespace="perturbation")
    hook = ParameterNamespaceHook()
    hook.before_node_run(screen.nodes[0])
    assert qualified("data_processing.qc") == "perturbation.data_processing.qc"
    hook.before_node_run(base.nodes[0])
    assert qualified("data_processing.qc") == "data_processing.qc"


def test_a_namespace_whose_parameters_are_shared_keeps_the_plain_setting():
    """zero_shot.* nodes read the evaluation's own parameters: their messages name evaluation.*"""
    base = pipeline([node(_identity, ["prompts", "params:evaluation"], "scores", name="score")])
    zero_shot = pipeline(base, namespace="zero_shot", parameters={"params:evaluation": "params:evaluation"})
    ParameterNamespaceHook().before_node_run(zero_shot.nodes[0])
    assert PARAMETER_NAMESPACE.get() is None
    assert qualified("evaluation.batch_size") == "evaluation.batch_size"


def test_a_non_zero_rank_keeps_saves_in_memory(tmp_path):
    target = tmp_path / "never_written.txt"

    class _File(MemoryDataset):
        def save(self, data):
            target.write_text(str(data))

    kept = _KeptInMemory(_File())
    assert not kept.exists()
    kept.save(42)
    assert kept.load() == 42 and kept.exists() and not target.exists()
