"""Prompt template files in the reference C2S format ({"model_input": [...], "response": [...]}):
reading, validation, and the formatters and prompt builders using their texts. The files are
written here (the reference package's own files are not copied)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from datasets import Dataset

from c2s_kedro.core.models.tokenizer import build_gene_tokenizer
from c2s_kedro.core.prompts.formatting import (
    C2SPromptFormatter,
    TemplateFileError,
    TissuePredictionFormatter,
    build_formatter,
    cell_generation_prompts,
    cell_type_prediction_prompts,
    load_templates,
    read_template_file,
    read_template_files,
    template_words,
)

GENES = [f"GENE{i}" for i in range(60)]
PREDICTION = {
    "model_input": [
        "Zorp {num_genes} genes of a {organism} cell, strongest first: {cell_sentence}.\nKind:",
        "Quux cell of {organism} with {num_genes} ranked genes {cell_sentence}.\nKind:",
    ],
    "response": ["{cell_type}."],
}
GENERATION = {
    "model_input": ["Blorb {num_genes} genes for a {organism} {cell_type} cell.\nGenes:"],
    "response": ["{cell_sentence}.", "Here: {cell_sentence}."],
}


def write(path, content) -> str:
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path)


@pytest.fixture()
def cells():
    rng = np.random.default_rng(0)
    return Dataset.from_dict({
        "cell_name": [f"c{i}" for i in range(10)],
        "cell_sentence": [" ".join(rng.permutation(GENES)[: 5 + i]) for i in range(10)],
        "cell_type": ["T cell", "B cell"] * 5,
        "tissue": ["blood"] * 6 + ["lung"] * 4,
        "organism": ["Homo sapiens"] * 10,
    })


def test_a_reference_file_is_read_by_path_and_from_an_installed_package(tmp_path, monkeypatch):
    path = write(tmp_path / "prediction.json", PREDICTION)
    templates = read_template_file("cell_type_prediction", path)
    assert templates.inputs == tuple(PREDICTION["model_input"]) and templates.responses == ("{cell_type}.",)
    assert templates.source == path and templates.response == "{cell_type}."
    package = tmp_path / "site" / "my_c2s_prompts"
    (package / "prompts").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    write(package / "prompts" / "generation.json", GENERATION)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    packaged = load_templates("cell_type_generation", "my_c2s_prompts:prompts/generation.json")
    assert packaged.inputs == tuple(GENERATION["model_input"]) and packaged.responses == tuple(GENERATION["response"])
    with pytest.raises(TemplateFileError, match="my_c2s_prompts:prompts/nothing.json: package 'my_c2s_prompts' has no file"):
        load_templates("cell_type_generation", "my_c2s_prompts:prompts/nothing.json")
    with pytest.raises(TemplateFileError, match="package 'no_such_c2s_package' is not installed"):
        load_templates("cell_type_generation", "no_such_c2s_package:prompts/x.json")


@pytest.mark.parametrize("content, field, message", [
    ({"response": ["{cell_type}."]}, "model_input", "has no field 'model_input'"),
    ({"model_input": ["{cell_sentence}"]}, "response", "has no field 'response'"),
    ({"model_input": [], "response": ["{cell_type}."]}, "model_input", "field 'model_input' is an empty list"),
    ({"model_input": ["{cell_sentence}"], "response": []}, "response", "field 'response' is an empty list"),
    ({"model_input": "{cell_sentence}", "response": ["{cell_type}."]}, "model_input", "must be a list of strings"),
    ({"model_input": ["{cell_sentence} of {tissue}"], "response": ["{cell_type}."]}, "model_input",
     r"model_input\[0\] has unknown placeholder\(s\) \{tissue\}"),
    ({"model_input": ["ok {cell_sentence}", "{}"], "response": ["{cell_type}."]}, "model_input",
     r"model_input\[1\] has unknown placeholder\(s\) \{\}"),
    ({"model_input": ["genes {num_genes}"], "response": ["{cell_type}."]}, "model_input",
     r"model_input\[0\] lacks \{cell_sentence\}"),
    ({"model_input": ["{cell_sentence} {"], "response": ["{cell_type}."]}, "model_input", r"model_input\[0\] is not a valid template"),
    ({"model_input": ["{cell_sentence}"], "response": ["It is {cell_type}"]}, "response", r"must be \[\"\{cell_type\}.\"\]"),
    ("{not json", None, "is not JSON"),
    (["a list"], None, "must hold a JSON object"),
])
def test_bad_template_files_name_the_file_and_the_field(tmp_path, content, field, message):
    path = write(tmp_path / "bad.json", content)
    with pytest.raises(TemplateFileError, match=message) as error:
        read_template_file("cell_type_prediction", path)
    assert path in str(error.value) and (field is None or field in str(error.value))


def test_a_missing_file_or_an_unknown_task_is_an_error(tmp_path):
    missing = str(tmp_path / "nowhere.json")
    with pytest.raises(TemplateFileError, match=f"template file {missing} does not exist"):
        read_template_files({"cell_type_prediction": missing})
    with pytest.raises(ValueError, match="unknown task\\(s\\) protein_folding"):
        read_template_files({"protein_folding": missing})
    assert read_template_files({"cell_type_prediction": None, "cell_type_generation": None}) == {}
    assert read_template_files(None) == {}


def test_the_formatter_uses_the_file_and_draws_a_response_per_sample(tmp_path, cells):
    files = read_template_files({"cell_type_prediction": write(tmp_path / "p.json", PREDICTION),
                                 "cell_type_generation": write(tmp_path / "g.json", GENERATION)})
    predicted = C2SPromptFormatter(task="cell_type_prediction", prompt_templates=files, seed=2).format_dataset(cells)
    assert all(p.startswith(("Zorp ", "Quux ")) for p in predicted["model_input"])
    assert {p.split()[0] for p in predicted["model_input"]} == {"Zorp", "Quux"}  # both paraphrases drawn
    assert predicted["response"] == [f"{t}." for t in cells["cell_type"]]
    generated = C2SPromptFormatter(task="cell_type_generation", prompt_templates=files, seed=2).format_dataset(cells)
    assert all(p.startswith("Blorb ") for p in generated["model_input"])
    starts = {r.startswith("Here: ") for r in generated["response"]}
    assert starts == {True, False}  # the two responses, drawn per sample
    for cell, response in zip(cells, generated["response"]):
        assert response.removeprefix("Here: ") == cell["cell_sentence"] + "."
    again = C2SPromptFormatter(task="cell_type_generation", prompt_templates=files, seed=2).format_dataset(cells)
    assert again["response"] == generated["response"]  # the same seed draws the same responses


def test_a_file_of_our_own_texts_formats_exactly_as_our_templates(tmp_path, cells):
    ours = load_templates("cell_type_prediction")
    path = write(tmp_path / "ours.json", {"model_input": list(ours.inputs), "response": [ours.response]})
    files = read_template_files({"cell_type_prediction": path})
    tokenizer = build_gene_tokenizer(GENES, template_words() + ["T cell", "B cell", "Homo sapiens"], model_max_length=60)
    common = {"task": "cell_type_prediction", "seed": 5, "tokenizer": tokenizer, "max_tokens": 60}
    from_file = C2SPromptFormatter(**common, prompt_templates=files).format_dataset(cells)
    default = C2SPromptFormatter(**common).format_dataset(cells)
    assert from_file.to_dict() == default.to_dict()  # one response: the rng draws the inputs only, as before


def test_inference_prompts_use_the_file(tmp_path, cells):
    tokenizer = build_gene_tokenizer(GENES, ["Zorp", "Quux", "Blorb", "genes", "T", "B", "cell", "Homo", "sapiens"], model_max_length=200)
    prediction = read_template_file("cell_type_prediction", write(tmp_path / "p.json", PREDICTION))
    prompts, kept, _ = cell_type_prediction_prompts(cells["cell_sentence"], None, tokenizer, 200, template_index=1,
                                                    templates=prediction)
    assert prompts[0] == PREDICTION["model_input"][1].format(num_genes=5, organism="Homo sapiens", cell_sentence=cells[0]["cell_sentence"])
    drawn, _, _ = cell_type_prediction_prompts(cells["cell_sentence"], None, tokenizer, 200, template_index=None,
                                               templates=prediction)
    assert {p.split()[0] for p in drawn} == {"Zorp", "Quux"}
    with pytest.raises(IndexError, match=f"template index 2 does not exist: cell_type_prediction has 2 templates in {prediction.source}"):
        cell_type_prediction_prompts(cells["cell_sentence"], None, tokenizer, 200, template_index=2, templates=prediction)
    generation = read_template_file("cell_type_generation", write(tmp_path / "g.json", GENERATION))
    built = cell_generation_prompts(cells["cell_sentence"], cells["cell_type"], tokenizer, 200, n_per_type=1, templates=generation)
    assert built["prompt"] == [f"Blorb {k} genes for a Homo sapiens {t} cell.\nGenes:" for k, t in zip(built["genes_requested"], ["B cell", "T cell"])]


def test_template_words_read_the_files_for_a_gene_level_vocabulary(tmp_path):
    words = template_words(("cell_type_prediction",), {"cell_type_prediction": write(tmp_path / "p.json", PREDICTION)})
    assert {"Zorp", "Quux", "strongest", "Kind:"} <= set(words)
    assert not any("{" in w for w in words) and "Below" not in words  # ours replaced, placeholders dropped


def test_tissue_files_may_name_the_cells_multi_cell_sentences(tmp_path, cells):
    path = write(tmp_path / "t.json", {
        "model_input": ["{num_cells} {organism} cells of one tissue:\n{multi_cell_sentences}\nTissue:"],
        "response": ["{tissue}."],
    })
    formatter = build_formatter("tissue_prediction", options={"cells_per_prompt": 2},
                                prompt_templates=read_template_files({"tissue_prediction": path}))
    assert isinstance(formatter, TissuePredictionFormatter)
    formatted = formatter.format_dataset(cells)
    assert all(p.startswith("2 Homo sapiens cells of one tissue:\nCell 1: ") for p in formatted["model_input"])
    assert sorted(set(formatted["response"])) == ["blood.", "lung."]
    with pytest.raises(TemplateFileError, match=r"response\[0\] has unknown placeholder\(s\) \{num_cells\}"):
        read_template_file("tissue_prediction", write(tmp_path / "t2.json", {"model_input": ["x"], "response": ["{tissue} {num_cells}"]}))
