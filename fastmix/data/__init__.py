"""Text in, token arrays out: `sources` finds and splits the documents and trains
the tokenizer, `corpus` caches the token arrays and opens the `Corpus` every job
reads (and seals its test split during a search), `embedded` builds the corpus
that ships with the suite (`make corpus`; no job imports it)."""
