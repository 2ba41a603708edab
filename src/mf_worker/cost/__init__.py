"""Cost control: what each model costs (``pricing``) and the per-organisation daily limit."""
