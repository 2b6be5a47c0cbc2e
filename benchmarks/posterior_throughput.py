"""Posterior sampling throughput on perturbation prompts: the project's path against one
``generate`` call per sample, on the same model, prompts and settings, in one run. Prints one
JSON object.

    python benchmarks/posterior_throughput.py [--prompts 2] [--samples 100] [--reference-samples 10]
                                              [--model data/06_models/perturbation_model] [--threads N]

Setting: the default simulated Perturb-seq screen and prompts (conf/base: a 50-gene control
sentence, about 80 tokens), responses of up to 200 genes, constrained decoding
(vocabulary genes only, no repeats), temperature 1.0.
(i) ours: ``core.tasks.perturbation.posterior.sample_posterior`` (one pass over each prompt; all samples decoded
    together, their attention reading the prompt's one cached copy; Gumbel-max draws);
(a) reference: ``model.generate`` once per sample (batch size 1, the prompt read again each
    time), same logits processor, temperature and max_new_tokens; measured on
    ``--reference-samples`` samples per prompt and reported per sample.
Samples per second and generated genes per sample are reported for both (a random model stops at
random places, so the genes per sample show whether both paths did the same amount of work), and
the process's peak resident memory (both paths and the screen's data, in MiB). Both paths use
torch's CPU threads (``--threads``, default torch's own): on a machine other jobs keep busy, every
multi-threaded operation waits for its threads to be scheduled and the timings swing several-fold
from run to run (read the load average it reports); ``--threads 1`` measures the work steadily.
Without ``--model`` the default architecture with random weights is used.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("KEDRO_DISABLE_TELEMETRY", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from transformers import GenerationConfig, LogitsProcessorList  # noqa: E402

from c2s_kedro.core.models.constraints import GeneVocabularyConstraint, postprocess_sentence  # noqa: E402
from c2s_kedro.core.models.loading import load_model  # noqa: E402
from c2s_kedro.core.simulate.screen import default_perturbseq  # noqa: E402
from c2s_kedro.core.tasks.perturbation.posterior import sample_posterior  # noqa: E402
from kedro.io import DataCatalog, MemoryDataset  # noqa: E402
from kedro.runner import SequentialRunner  # noqa: E402

from c2s_kedro.pipeline_registry import own_pipelines  # noqa: E402


class _Kept(MemoryDataset):
    def _release(self) -> None:  # keep what the benchmark reads after the run
        pass


def _params_entries(name: str, value) -> dict:
    entries = {f"params:{name}": value}
    if isinstance(value, dict):
        for key, inner in value.items():
            entries.update(_params_entries(f"{name}.{key}", inner))
    return entries


def setting(model_path: str | None):
    """The default screen through the perturbation_data pipeline and perturbation_finetuning's base
    model and prompts, in memory."""
    with open("conf/base/parameters_perturbation.yml") as stream:
        params = yaml.safe_load(stream)["perturbation"]
    pipelines = own_pipelines()
    pipeline = pipelines["perturbation_data"] + pipelines["perturbation_finetuning"].only_nodes(
        "initialize_perturbation_model", "format_perturbation_prompts")
    datasets = {name: _Kept(copy_mode="assign") for name in pipeline.all_outputs()}
    datasets["perturbseq_raw"] = MemoryDataset(default_perturbseq(), copy_mode="assign")
    datasets.update({k: MemoryDataset(v, copy_mode="assign") for k, v in _params_entries("perturbation", params).items()})
    if model_path:  # prompts fitted with the given model's tokenizer and context
        pipeline = pipeline - pipeline.only_nodes_with_outputs("perturbation_base_model")
        datasets["perturbation_base_model"] = MemoryDataset(load_model(model_path), copy_mode="assign")
    catalog = DataCatalog(datasets=datasets)
    SequentialRunner().run(pipeline, catalog)
    vocabulary = catalog.load("perturbation.vocabulary")
    model = catalog.load("perturbation_base_model")
    model.model.eval()
    return model, catalog.load("perturbation_prompts")["test"], list(vocabulary)


def reference_samples(language_model, prompt: str, genes, n: int, max_new_tokens: int, seed: int) -> list[str]:
    """One model.generate call per sample, as a per-sample loop would do it."""
    tokenizer, model = language_model.tokenizer, language_model.model
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                              pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    texts = []
    torch.manual_seed(seed)
    with torch.inference_mode():
        for _ in range(n):
            output = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config,
                                    logits_processor=LogitsProcessorList([GeneVocabularyConstraint(tokenizer, genes)]))
            texts.append(tokenizer.decode(output[0, ids.shape[1]:], skip_special_tokens=True))
    return texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--reference-samples", type=int, default=10)
    parser.add_argument("--model", default=None, help="a model directory (default: random weights)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model, prompts, genes = setting(args.model)
    budget = int(prompts["max_new_tokens"][0])
    chosen = prompts.select(range(min(args.prompts, prompts.num_rows)))["model_input"]
    vocabulary = set(genes)
    sample_posterior(model, chosen[:1], genes, n_samples=4, temperatures=[1.0], max_new_tokens=budget)  # warm-up

    start = time.perf_counter()
    ours = sample_posterior(model, chosen, genes, n_samples=args.samples, temperatures=[1.0], max_new_tokens=budget)
    ours_seconds = time.perf_counter() - start

    start = time.perf_counter()
    reference = []
    for i, prompt in enumerate(chosen):
        reference += reference_samples(model, prompt, genes, args.reference_samples, budget, seed=i)
    reference_seconds = time.perf_counter() - start
    reference_genes = [len(postprocess_sentence(t, vocabulary)[0].split()) for t in reference]

    ours_rate = len(ours) / ours_seconds
    reference_rate = len(reference) / reference_seconds
    print(json.dumps({
        "setting": {
            "prompts": len(chosen), "samples_per_prompt_ours": args.samples,
            "samples_per_prompt_reference": args.reference_samples,
            "prompt_tokens_mean": float(np.mean([len(model.tokenizer(p)["input_ids"]) for p in chosen])),
            "max_new_tokens": budget, "model": args.model or "default architecture, random weights",
            "parameters": int(model.model.num_parameters()), "threads": torch.get_num_threads(),
            "load_average": os.getloadavg(),
        },
        "ours_samples_per_s": round(ours_rate, 2),
        "reference_samples_per_s": round(reference_rate, 3),
        "speedup": round(ours_rate / reference_rate, 2),
        "genes_per_sample_ours": float(ours["n_genes"].mean()),
        "genes_per_sample_reference": float(np.mean(reference_genes)),
        "seconds": {"ours": round(ours_seconds, 2), "reference": round(reference_seconds, 2)},
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),  # KiB on Linux
    }, indent=2))


if __name__ == "__main__":
    main()
