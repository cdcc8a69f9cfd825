"""The lossjax experiment harness: trainer, models, data, study and reports."""
