-- A journal batch is sent to PostgreSQL whole, in one round trip: BEGIN, the
-- balance update, the row statements and COMMIT together. What the writer
-- would otherwise check between them (every balance row at its expected
-- version, every finished hold active, every grant id the account's own) is
-- checked inside the transaction by this function, which raises when it is
-- not so: the error aborts the transaction, its COMMIT rolls it back, and the
-- writer writes the batch again statement by statement, handling each
-- account's case.
CREATE FUNCTION creditd_journal_expect(ok boolean, what text) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    IF ok IS NOT TRUE THEN
        RAISE EXCEPTION 'journal batch not written at once: %', what;
    END IF;
    RETURN true;
END
$$;
