"""pretraining: cell_sentences -> foundation_model (gene-level tokenizer + GPT-NeoX trained here)."""

from kedro.pipeline import Pipeline, node, pipeline

from c2s_kedro.pipelines.pretraining import nodes


def create_pipeline(**kwargs) -> Pipeline:
    return pipeline(
        [
            node(
                nodes.initialize_foundation_model,
                ["vocabulary", "cell_sentences", "params:pretraining"],
                "initial_foundation_model",
                name="initialize_foundation_model",
            ),
            node(
                nodes.build_pretraining_corpus,
                ["cell_sentences", "data_split", "initial_foundation_model", "params:pretraining"],
                ["pretraining_train_corpus", "pretraining_val_corpus"],
                name="build_pretraining_corpus",
            ),
            node(
                nodes.pretrain_foundation_model,
                ["initial_foundation_model", "pretraining_train_corpus", "pretraining_val_corpus", "params:pretraining"],
                ["foundation_model", "pretraining_log"],
                name="pretrain_foundation_model",
            ),
            node(nodes.plot_pretraining_loss, "pretraining_log", "pretraining_loss_plot", name="plot_pretraining_loss"),
            node(
                nodes.summarize_pretraining,
                ["pretraining_log", "foundation_model"],
                "pretraining_metrics",
                name="summarize_pretraining",
            ),
        ]
    )
