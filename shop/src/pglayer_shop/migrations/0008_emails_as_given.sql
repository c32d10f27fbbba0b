-- An email is stored as the client gave it: the contract's text fields round-trip exactly,
-- and only uniqueness looks through Unicode forms (the key of 0004_email_keys, unchanged).
-- Emails stored since 0004 stay in the NFC form it gave them; their originals are not known.
DROP TRIGGER users_email_nfc ON users;
DROP FUNCTION shop_users_email_nfc();
