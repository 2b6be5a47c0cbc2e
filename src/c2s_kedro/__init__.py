"""c2s-kedro: Cell2Sentence workflows as Kedro pipelines."""

__version__ = "0.1.0"
