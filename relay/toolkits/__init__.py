"""DICOM toolkit adapters behind one interface (base): embedded, dcmtk, dcm4che; the choice of
one (select), what they share (common), DICOM TLS (tls)."""
