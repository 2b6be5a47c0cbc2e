"""Project pipelines."""

from kedro.pipeline import Pipeline

from c2s_kedro.pipelines import benchmarking, data_processing, embedding, pretraining, sentence_conversion


def register_pipelines() -> dict[str, Pipeline]:
    """The default ``kedro run`` goes from raw counts to sentences and the conversion benchmark."""
    pipelines = {
        "data_processing": data_processing.create_pipeline(),
        "sentence_conversion": sentence_conversion.create_pipeline(),
        "benchmarking": benchmarking.create_pipeline(),
        "pretraining": pretraining.create_pipeline(),
        "embedding": embedding.create_pipeline(),
    }
    pipelines["__default__"] = sum(pipelines.values(), Pipeline([]))
    return pipelines
