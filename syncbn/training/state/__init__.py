"""A run's saved state: checkpoint files (:mod:`.checkpoint`), which of them are kept
(:mod:`.manager`: last, step-K, best), what a resume may change (:mod:`.resume_policy`) and
progress counted in samples (:mod:`.progress`)."""
