"""A run's inputs: prompt datasets (`prompts`) and models (`models`: built-in, random or a path)."""
