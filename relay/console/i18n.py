"""The console in English and Spanish: the browser's language (Accept-Language) unless the
user chose one (a cookie). English texts are the keys; a text without a translation shows
in English."""

from __future__ import annotations

from collections.abc import Callable

LANGUAGES = ("en", "es")
COOKIE = "relay_lang"

SPANISH = {
    "Overview": "Resumen",
    "Studies": "Estudios",
    "Failed": "Fallidos",
    "Destinations": "Destinos",
    "Rule tester": "Probador de reglas",
    "Configuration": "Configuración",
    "Log out": "Cerrar sesión",
    "Log in": "Iniciar sesión",
    "User": "Usuario",
    "Password": "Contraseña",
    "Wrong user name or password.": "Usuario o contraseña incorrectos.",
    "Too many failed logins: try again in {seconds} s.":
        "Demasiados intentos fallidos: vuelva a intentarlo en {seconds} s.",
    "Receiver": "Receptor",
    "listening on port {port}": "escuchando en el puerto {port}",
    "NOT listening on port {port}": "NO escucha en el puerto {port}",
    "Associations open": "Asociaciones abiertas",
    "Spool disk free": "Espacio libre del spool",
    "Low on space: the receiver stops taking objects at {floor}.":
        "Poco espacio: el receptor deja de aceptar objetos en {floor}.",
    "Destination": "Destino",
    "Kind": "Tipo",
    "State": "Estado",
    "Queue": "Cola",
    "Oldest": "Más antiguo",
    "Delivered (last hour)": "Entregados (última hora)",
    "Held studies": "Estudios retenidos",
    "Last error": "Último error",
    "up": "activo",
    "down": "caído",
    "paused": "en pausa",
    "Quarantine by reason": "Cuarentena por motivo",
    "Nothing in quarantine.": "Nada en cuarentena.",
    "Delivered per 10 minutes, last 6 hours": "Entregados cada 10 minutos, últimas 6 horas",
    "Search": "Buscar",
    "PatientID, name, accession number or StudyInstanceUID":
        "PatientID, nombre, número de acceso o StudyInstanceUID",
    "Patient ID (received → sent)": "ID de paciente (recibido → enviado)",
    "Patient name": "Nombre del paciente",
    "Accession": "Nº de acceso",
    "From": "Desde",
    "Instances": "Instancias",
    "First received": "Primera recepción",
    "Last event": "Último evento",
    "No study found.": "No se encontró ningún estudio.",
    "delivered": "entregados",
    "queued": "en cola",
    "held": "retenidos",
    "failed": "fallidos",
    "Study": "Estudio",
    "Release now": "Liberar ahora",
    "Retry its failed objects": "Reintentar sus objetos fallidos",
    "Send again ({count})": "Enviar de nuevo ({count})",
    "Timeline": "Cronología",
    "Time": "Hora",
    "Step": "Paso",
    "Status": "Estado DICOM",
    "Detail": "Detalle",
    "Series": "Serie",
    "Objects": "Objetos",
    "Reason": "Motivo",
    "Retry": "Reintentar",
    "Retry selected": "Reintentar seleccionados",
    "Retry all {count}": "Reintentar los {count}",
    "Delete selected": "Eliminar seleccionados",
    "Delete all {count}": "Eliminar los {count}",
    "Delete {count} object(s) for good?": "¿Eliminar {count} objeto(s) definitivamente?",
    "Yes, delete {count}": "Sí, eliminar {count}",
    "Cancel": "Cancelar",
    "Echo": "Echo",
    "Pause": "Pausar",
    "Resume": "Reanudar",
    "Where": "Dónde",
    "Upload DICOM files to see what the running rules and routes would do. Nothing is stored.":
        "Suba archivos DICOM para ver qué harían las reglas y rutas en uso. No se guarda nada.",
    "Test": "Probar",
    "no change": "sin cambios",
    "to": "a",
    "not to": "no a",
    "its own rules": "sus propias reglas",
    "not relayable": "no reenviable",
    "Reload": "Recargar",
    "Secrets are hidden.": "Los secretos están ocultos.",
    "You may not do this: it needs the role {role}.":
        "No puede hacer esto: requiere el rol {role}.",
    "The history is off ([history] enabled = false).":
        "El historial está desactivado ([history] enabled = false).",
    "The history database does not answer: {error}":
        "La base de datos del historial no responde: {error}",
    "Language": "Idioma",
    "Relay": "Relay",
    "Engine": "Motor",
}


def language(cookie: str | None, accept: str | None) -> str:
    """The user's choice, else the first language of the browser's we have, else English."""
    if cookie in LANGUAGES:
        return cookie
    for part in (accept or "").split(","):
        code = part.split(";")[0].strip().lower()[:2]
        if code in LANGUAGES:
            return code
    return "en"


def translator(lang: str) -> Callable[..., str]:
    table = SPANISH if lang == "es" else {}

    def gettext(text: str, **values: object) -> str:
        out = table.get(text, text)
        return out.format(**values) if values else out

    return gettext
