-- Which generator and model wrote an episode (#26, the fallback generator): the final write
-- records the role and plugin (`primary:openai`, `fallback:openai`) and the model the
-- generator reported, so an episode written during a provider outage says so (`status`, the
-- logs, the console). Both stay NULL on episodes written before, and until an episode is
-- written.
ALTER TABLE episodes ADD COLUMN generator text, ADD COLUMN model text;
