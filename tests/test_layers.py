"""kedro-viz layers: every dataset of every registered pipeline has one, and their order is acyclic,
so that every pipeline view shows its layers."""

from __future__ import annotations

import logging
import os
import sys
from graphlib import CycleError, TopologicalSorter

import pytest

from tests.helpers import copy_project


@pytest.fixture(scope="module")
def viz(tmp_path_factory):
    """kedro-viz's own data access manager, populated from a copy of the project as `kedro viz
    build` does."""
    from kedro_viz.data_access import data_access_manager
    from kedro_viz.server import load_and_populate_data

    root = copy_project(tmp_path_factory.mktemp("project"))
    cwd = os.getcwd()
    os.chdir(root)
    try:
        data_access_manager.reset_fields()
        load_and_populate_data(root)
        yield data_access_manager
    finally:
        os.chdir(cwd)
        sys.modules.pop("c2s_kedro.pipeline_registry", None)


def _pipelines(viz):
    return [p.id for p in viz.registered_pipelines.as_list()]


def test_every_dataset_of_every_pipeline_has_a_layer(viz):
    from kedro_viz.models.flowchart.nodes import DataNode

    assert len(_pipelines(viz)) >= 14
    without = {
        pipeline: sorted(node.name for node in viz.get_nodes_for_registered_pipeline(pipeline)
                         if isinstance(node, DataNode) and not node.layer)
        for pipeline in _pipelines(viz)
    }
    assert not any(without.values()), f"datasets without a layer (give them metadata in conf/base/catalog.yml): {without}"


def test_every_pipeline_view_sorts_its_layers_without_a_cycle(viz, caplog):
    """kedro-viz's own sort (it switches layers off with a warning on a cycle), on the graph each
    view shows, modular-pipeline boxes included."""
    from kedro_viz.api.rest.responses.pipelines import get_pipeline_response

    for pipeline in _pipelines(viz):
        with caplog.at_level(logging.WARNING, logger="kedro_viz"):
            response = get_pipeline_response(pipeline)
        assert "circular" not in caplog.text, f"{pipeline}: {caplog.text}"
        assert response.layers, f"{pipeline} shows no layers"
        shown = {node.layer for node in response.nodes if getattr(node, "layer", None)}
        assert shown <= set(response.layers)


def test_layers_follow_every_node_from_input_to_output(viz):
    """The same check without kedro-viz's code: layer of each input -> layer of each output, over
    every node of the default pipeline, is a DAG, and the datasets' layers come in the documented order."""
    from kedro.framework.project import pipelines

    layer = viz.catalog.get_layer_for_dataset
    order: dict[str, set[str]] = {}
    for node in pipelines["__default__"].nodes:
        inputs = {layer(name) for name in node.inputs if not name.startswith("params:") and name != "parameters"}
        for output in node.outputs:
            order.setdefault(layer(output), set()).update(inputs - {layer(output)})
    try:
        sorted_layers = list(TopologicalSorter(order).static_order())
    except CycleError as error:
        pytest.fail(f"layers in a cycle: {error.args[1]}")
    assert sorted_layers[0] == "raw" and sorted_layers[-1] == "reporting"
    assert sorted_layers.index("models") < sorted_layers.index("finetuning_input") < sorted_layers.index("finetuned_models")
