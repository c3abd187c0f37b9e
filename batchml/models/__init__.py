"""Models: point-in-time training (``train``), metrics and the promotion gate (``evaluate``), when to
retrain and how a challenger is built (``retrain``), versioned artifacts (``registry``), streaming
scoring (``scoring``), compiled trees (``compiled``), reason codes (``reasons``) and registry changes
by hand (``manage``)."""
