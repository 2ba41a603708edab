-- The queue table is read by short OLTP statements only (claims, heartbeats, the metrics'
-- counts through partial indexes). Its conditions on times (`run_after <= now`) are estimated
-- from histograms over the whole history, where most rows are in the past, so the planner
-- guessed a third of a million pending rows due and chose a parallel index scan for the
-- scrape's counts: starting its two workers took 10 ms of every scrape at a million projects,
-- for 300 rows. No parallel workers for this table (#16).
ALTER TABLE episode_schedule_queue SET (parallel_workers = 0);
