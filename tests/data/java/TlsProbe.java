// Java's own TLS (JSSE, what dcm4che's tools use) with the key stores and TLS settings that
// dicom-relay gives dcm4che: proves them where dcm4che itself cannot be installed.
//
//   java TlsProbe.java client|server HOST PORT KEYSTORE KEYPASS TRUSTSTORE|- TRUSTPASS
//                      PROTOCOLS CIPHERS need|noauth
// Prints the negotiated protocol and suite, and the line the peer sent.
import java.io.BufferedReader;
import java.io.FileInputStream;
import java.io.InputStreamReader;
import java.net.InetAddress;
import java.nio.charset.StandardCharsets;
import java.security.KeyStore;
import java.security.cert.X509Certificate;
import javax.net.ssl.KeyManagerFactory;
import javax.net.ssl.SSLContext;
import javax.net.ssl.SSLServerSocket;
import javax.net.ssl.SSLSocket;
import javax.net.ssl.TrustManager;
import javax.net.ssl.TrustManagerFactory;

public class TlsProbe {
    static KeyStore load(String path, String pass) throws Exception {
        KeyStore store = KeyStore.getInstance("PKCS12");
        try (FileInputStream in = new FileInputStream(path)) {
            store.load(in, pass.toCharArray());
        }
        return store;
    }

    public static void main(String[] a) throws Exception {
        KeyManagerFactory kmf =
            KeyManagerFactory.getInstance(KeyManagerFactory.getDefaultAlgorithm());
        kmf.init(load(a[3], a[4]), a[4].toCharArray());
        TrustManager[] trust = null;
        if (!a[5].equals("-")) {
            TrustManagerFactory tmf =
                TrustManagerFactory.getInstance(TrustManagerFactory.getDefaultAlgorithm());
            tmf.init(load(a[5], a[6]));
            trust = tmf.getTrustManagers();
        }
        SSLContext ctx = SSLContext.getInstance("TLS");
        ctx.init(kmf.getKeyManagers(), trust, null);
        SSLSocket socket;
        if (a[0].equals("client")) {
            socket = (SSLSocket) ctx.getSocketFactory().createSocket(a[1], Integer.parseInt(a[2]));
        } else {
            SSLServerSocket server = (SSLServerSocket) ctx.getServerSocketFactory()
                .createServerSocket(Integer.parseInt(a[2]), 1, InetAddress.getByName(a[1]));
            System.out.println("listening");
            System.out.flush();
            socket = (SSLSocket) server.accept();
            socket.setNeedClientAuth(a[9].equals("need"));
        }
        socket.setEnabledProtocols(a[7].split(","));
        socket.setEnabledCipherSuites(a[8].split(","));
        socket.startHandshake();
        System.out.println("protocol=" + socket.getSession().getProtocol()
                           + " cipher=" + socket.getSession().getCipherSuite());
        if (a[0].equals("server") && a[9].equals("need")) {
            X509Certificate peer = (X509Certificate) socket.getSession().getPeerCertificates()[0];
            System.out.println("client=" + peer.getSubjectX500Principal().getName());
        }
        socket.getOutputStream().write("hello\n".getBytes(StandardCharsets.US_ASCII));
        socket.getOutputStream().flush();
        BufferedReader in = new BufferedReader(
            new InputStreamReader(socket.getInputStream(), StandardCharsets.US_ASCII));
        System.out.println("peer said: " + in.readLine());
        socket.close();
    }
}
