"""The edit stage: read an object, run the rules on its PS3.19 XML, write back what changed
(editor, rules, dicomxml, splice, scan), and de-identification (deidentify)."""
