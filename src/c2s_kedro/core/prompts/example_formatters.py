"""An example of a custom prompt formatter (workflow notes section 7).

Name it in parameters to use it:

    finetuning:
      formatter: c2s_kedro.core.prompts.example_formatters.TissueAwareCellTypeFormatter
      formatter_options: {top_k_genes: 100, tissue_column: tissue}
"""

from __future__ import annotations

from c2s_kedro.core.prompts.formatting import PromptFormatter

TEMPLATES = (
    "These are the {num_genes} top expressed genes of a cell from {tissue}, highest first.\nCell sentence: {genes}.\nIts cell type is:",
    "A cell sampled from {tissue} expresses these {num_genes} genes most strongly, in order.\nCell sentence: {genes}.\nIts cell type is:",
    "Cell from {tissue}; its {num_genes} most expressed genes in descending order follow.\nCell sentence: {genes}.\nIts cell type is:",
)


class TissueAwareCellTypeFormatter(PromptFormatter):
    """Cell-type prediction with the tissue named in the prompt, one of a few templates per cell."""

    task = "cell_type_prediction"

    def __init__(self, seed: int = 0, top_k_genes: int = 100, label_column: str = "cell_type", tissue_column: str = "tissue"):
        super().__init__(seed=seed)
        self.top_k_genes = top_k_genes
        self.label_column = label_column
        self.tissue_column = tissue_column

    def required_columns(self) -> list[str]:
        return ["cell_sentence", self.label_column, self.tissue_column]

    def format_batch(self, batch: dict[str, list]) -> dict[str, list]:
        n = len(batch["cell_sentence"])
        choices = self.rng.integers(0, len(TEMPLATES), size=n)
        inputs = []
        for sentence, tissue, choice in zip(batch["cell_sentence"], batch[self.tissue_column], choices):
            genes = (sentence or "").split()[: self.top_k_genes]
            inputs.append(TEMPLATES[choice].format(num_genes=len(genes), tissue=tissue or "an unknown tissue", genes=" ".join(genes)))
        return {"sample_type": [self.task] * n, "model_input": inputs, "response": [f"{label}." for label in batch[self.label_column]]}
