-- Features on the scale of the scanner before its upgrade of 2026-10-14, which re-scores CVSS 0.8 higher
-- (capped at 10) and counts references 1.6x: a model trained on older findings reads newer ones as it
-- learnt them. Used by configs/candidates/vuln_risk.better.yaml; try it with
--   batchml try vuln_risk --config configs/candidates/vuln_risk.better.yaml
SELECT
    *,
    CASE WHEN found_at >= TIMESTAMP '2026-10-14' THEN cvss_base - 0.8 ELSE cvss_base END AS cvss_v1,
    CASE WHEN found_at >= TIMESTAMP '2026-10-14' THEN n_references / 1.6 ELSE n_references END AS references_v1
FROM source
