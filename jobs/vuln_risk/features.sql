-- Derived features for vuln_risk; to use it, set in configs/vuln_risk.yaml:
--   features:
--     sql: jobs/vuln_risk/features.sql
--     numeric: [..., exploit_pressure, references_log]
-- `source` is the raw source; keep its columns (SELECT *) and add the derived ones.
SELECT
    *,
    epss * cvss_base / 10 AS exploit_pressure,      -- likely to be exploited AND severe
    ln(1 + n_references) AS references_log          -- references grow with attention, heavy-tailed
FROM source
