"""Online loading for the trainer: packed datasets and their blend, the seeded order, micro-batches."""
