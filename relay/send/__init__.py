"""The send stage: the vocabulary of results (results), one sender per destination (sender),
study holds (hold), transcoding on refusal (transcode) and DICOMweb (stow)."""
